"""``qcore.quantize(bias_correction=True)``: each quantized conv/linear's bias absorbs the float-vs-
quantized mean of its output per channel over the calibration batches.

Hand-computed on one linear with 4-bit weights (the quantized output rebuilt here from the
observer formulas); every corrected layer's output mean equals the float model's afterwards
(each layer measured after the ones before it were corrected); and on the digits CNN with
per-tensor symmetric 4-bit weights (range -8..7; per-channel 4-bit barely costs that CNN any
accuracy) it raises the output SQNR and the accuracy over six seeds (mean and spread printed;
``bench/bench_accuracy.py --models digits --weights per-tensor --seeds 0 1 2 3 4 5`` prints
the same figures).
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import attrs
import pytest
import torch
from torch.fx import GraphModule, Interpreter

import qcore
from qcore import observers
from qcore.metrics import sqnr_db
from qcore.testing import requires_backend

pytest.importorskip("sklearn")

from test_qat_digits import BATCH, accuracy, load_digits_split, train_float  # noqa: E402

dq_ops = torch.ops.quantized_decomposed


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def four_bit_config(backend: str, per_channel: bool = True) -> Any:
    """The backend's default config with weights on -8..7 (stored as int8); ``per_channel=False``:
    one symmetric scale per weight tensor (a min/max observer)."""
    quantizer_class: Any = qcore.get_plugin_manager().get_backend(backend).quantizer_class
    config = quantizer_class.default_config()
    weight = attrs.evolve(config.weight, quant_min=-8, quant_max=7)
    if not per_channel:
        weight = attrs.evolve(weight, qscheme=torch.per_tensor_symmetric,
                              observer_or_fake_quant_ctr=observers.MinMaxObserver.with_args(eps=2**-12))
    return attrs.evolve(config, weight=weight)


def node(model: GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in model.graph.nodes if n.name == name)


def test_the_correction_is_the_float_minus_quantized_output_mean_per_channel_by_hand():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3)).eval()
    state = copy.deepcopy(model.state_dict())
    calibration = [(torch.randn(8, 6) + 0.5,) for _ in range(3)]
    config = four_bit_config("reference")
    plain = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, config=config,
                           measure_latency=False)
    result = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, config=config,
                            measure_latency=False, bias_correction=True)
    # the quantized linear rebuilt by hand: the input's qparams as calibration chose them (a histogram
    # observer), the weights' from the symmetric formula on -8..7
    x = torch.cat([b[0] for b in calibration])
    quantize = node(result.converted, "linear").args[0].args[0]
    assert quantize.target == dq_ops.quantize_per_tensor.default
    x_scale, x_zero = quantize.args[1], quantize.args[2]
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    w_scale = weight.abs().amax(dim=1) / 7.5  # symmetric on -8..7: max|W| / ((7 - -8) / 2)
    weight_dq = node(result.converted, "linear").args[1]
    assert torch.allclose(result.converted.get_buffer(str(weight_dq.args[1].target)), w_scale, rtol=1e-6)
    # quantize as torch's quantized_decomposed ops do: round(v * (1 / scale)) (a weight at exactly
    # -7.5 steps rounds to -7 that way, to -8 by v / scale)
    w_quant = torch.clamp(torch.round(weight * (1.0 / w_scale[:, None])), -8, 7) * w_scale[:, None]
    x_quant = (torch.clamp(torch.round(x * (1.0 / x_scale)) + x_zero, -128, 127) - x_zero) * x_scale
    shift = (x @ weight.T + bias).double().mean(0) - (x_quant @ w_quant.T + bias).double().mean(0)
    recorded = result.converted.meta["qcore_bias_correction"]
    assert [c["node"] for c in recorded] == ["linear"]
    assert torch.allclose(torch.tensor(recorded[0]["shift"]), shift.float(), atol=1e-6)
    assert shift.abs().max() > 1e-3  # 4-bit weights move the mean: the check is not of zeros
    bias_name = str(node(result.converted, "linear").args[2].target)
    assert torch.allclose(result.converted.get_parameter(bias_name), bias + shift.float(), atol=1e-6)
    assert torch.equal(plain.converted.get_parameter(bias_name), bias)  # without the option: the bias as it was
    assert result.report.algorithms == [f"bias_correction: corrected 1 biases (linear); largest shift {shift.abs().max():.3g}"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Means(Interpreter):
    """Per-channel (last dim) means of the named nodes' outputs over all rows."""

    def __init__(self, module: GraphModule, names: set) -> None:
        super().__init__(module)
        self.names, self.rows = names, {}  # type: ignore[var-annotated]

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.rows.setdefault(n.name, []).append(value.detach().double().reshape(-1, value.shape[-1]))
        return value

    def means(self, batches: list) -> dict:
        for batch in batches:
            self.run(*batch)
        return {name: torch.cat(rows).mean(0) for name, rows in self.rows.items()}


def test_each_layer_is_measured_after_the_ones_before_it_were_corrected():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8, bias=False),
                                torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    calibration = [(torch.randn(16, 8),) for _ in range(4)]
    result = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration,
                            config=four_bit_config("reference"), measure_latency=False, bias_correction=True)
    names = {"linear", "linear_1", "linear_2"}
    assert [c["node"] for c in result.converted.meta["qcore_bias_correction"]] == ["linear", "linear_1", "linear_2"]
    # linear_1 had no bias: the correction created one
    assert str(node(result.converted, "linear_1").args[2].target) == "_corrected_bias_0"
    float_means = Means(result.exported, names).means(calibration)
    corrected_means = Means(result.converted, names).means(calibration)
    for name in sorted(names):  # corrected in order, so each mean is the float one
        assert torch.allclose(corrected_means[name], float_means[name], atol=1e-5), name
    plain = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration,
                           config=four_bit_config("reference"), measure_latency=False)
    plain_means = Means(plain.converted, names).means(calibration)
    assert max(float((plain_means[n] - float_means[n]).abs().max()) for n in names) > 1e-3


def digits_bias_correction(seed: int, backend: str = "reference", epochs: int = 6, per_channel: bool = True) -> dict:
    """Train the digits CNN (``epochs``, seed ``seed``), quantize it with 4-bit weights (per channel,
    or per tensor with ``per_channel=False``) with and without bias correction (8 calibration batches of 64 training images) and measure the test
    accuracy (%) and the output SQNR (dB) on the 450 test images of both, and of float."""
    data = load_digits_split(seed)
    model = train_float(seed, data, epochs=epochs)
    x_train, _, x_test, y_test = data
    calibration = [(x_train[i : i + BATCH],) for i in range(0, 8 * BATCH, BATCH)]
    held_out = [x_test[i : i + BATCH] for i in range(0, len(x_test) - BATCH + 1, BATCH)]
    with torch.no_grad():
        reference = torch.cat([model(x) for x in held_out])
    figures: dict = {"float": accuracy(model, x_test, y_test)}
    for name, corrected in (("plain", False), ("bias_correction", True)):
        result = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration,
                                config=four_bit_config(backend, per_channel), measure_latency=False,
                                bias_correction=corrected)
        figures[name] = accuracy(result.model, x_test, y_test)
        with torch.no_grad():
            figures[f"{name}_db"] = sqnr_db(reference, torch.cat([result.model(x) for x in held_out]))
        figures[f"{name}_result"] = result
    return figures


@requires_backend("onednn")
def test_bias_correction_on_the_lowered_digits_cnn_with_4_bit_weights():
    figures = digits_bias_correction(seed=0, backend="onednn")
    corrected = figures["bias_correction_result"]
    assert corrected.lowered is not None
    # the three convs (batch norm folded in) and the classifier
    assert len(corrected.converted.meta["qcore_bias_correction"]) == 4
    print(f"\nonednn seed 0: float {figures['float']:.2f}%, 4-bit PTQ {figures['plain']:.2f}% ({figures['plain_db']:.2f} dB), "
          f"with bias correction {figures['bias_correction']:.2f}% ({figures['bias_correction_db']:.2f} dB)")
    assert figures["bias_correction_db"] >= figures["plain_db"] + 1.0
    assert figures["bias_correction"] >= figures["plain"]


@pytest.mark.slow
def test_bias_correction_raises_sqnr_and_accuracy_over_six_seeds_with_per_tensor_4_bit_weights():
    # measured (reference backend, one thread): float 98.52%, plain 98.26%, corrected 98.52%; gain
    # +0.26 points (sd 0.36), higher or equal on 6 of 6 seeds; +3.48 dB (sd 0.98, smallest 1.87)
    rows = [digits_bias_correction(seed, per_channel=False) for seed in range(6)]
    gains_db = [r["bias_correction_db"] - r["plain_db"] for r in rows]
    gains = [r["bias_correction"] - r["plain"] for r in rows]
    for seed, r in enumerate(rows):
        print(f"\nseed {seed}: float {r['float']:.2f}%  4-bit PTQ {r['plain']:.2f}% ({r['plain_db']:.2f} dB)  "
              f"bias correction {r['bias_correction']:.2f}% ({r['bias_correction_db']:.2f} dB)", end="")
    standard_error = statistics.stdev(gains) / len(gains) ** 0.5
    print(f"\nmean gain {statistics.mean(gains):+.2f} points (sd {statistics.stdev(gains):.2f}, "
          f"standard error {standard_error:.2f}), "
          f"{statistics.mean(gains_db):+.2f} dB (sd {statistics.stdev(gains_db):.2f})")
    assert min(gains_db) > 1.5 and statistics.mean(gains_db) > 3.0
    assert statistics.mean(gains) > standard_error  # measurably above zero, not just positive
    assert all(g >= 0 for g in gains)  # never worse on any seed
