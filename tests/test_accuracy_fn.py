"""``qcore.quantize(accuracy_fn=..., max_drop=...)``: a user metric, measured on what runs (the
lowered model for onednn), decides when enough partitions are float.

The metric is test accuracy on scikit-learn's digits of the small CNN of ``test_qat_digits``
(trained here, seed 0, 6 epochs, a few seconds), quantized with 2-bit weights (range -2..1):
plain PTQ loses several points there, so the search has to keep partitions float until the
accuracy is within ``max_drop`` of the float model's. Bad arguments are one-line errors.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
import torch

import qcore
from qcore.accuracy import AccuracyTargetError
from qcore.errors import QuantizeError
from qcore.metrics import sqnr_db
from qcore.testing import requires_backend

pytest.importorskip("sklearn")

from test_qat_digits import BATCH, accuracy, load_digits_split, train_float  # noqa: E402

BACKENDS = ["reference", pytest.param("onednn", marks=requires_backend("onednn"))]
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple:
    """(float model, data, calibration batches): the digits CNN trained for 6 epochs with seed 0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits_split(0)
        model = train_float(0, data, epochs=6)
    finally:
        torch.set_num_threads(threads)
    calibration = [(data[0][i : i + BATCH],) for i in range(0, 8 * BATCH, BATCH)]
    return model, data, calibration


def two_bit_config(backend: str) -> Any:
    config = qcore.get_plugin_manager().get_backend(backend).quantizer_class.default_config()
    return attrs.evolve(config, weight=attrs.evolve(config.weight, quant_min=-2, quant_max=1))


def is_quantized(model: torch.fx.GraphModule) -> bool:
    return any("quantize" in str(n.target) or str(n.target).startswith("onednn.") for n in model.graph.nodes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_fn_keeps_the_drop_within_max_drop_on_what_runs(digits, backend):
    model, data, calibration = digits
    x_test, y_test = data[2], data[3]
    seen: list = []

    def digits_accuracy(candidate: torch.nn.Module) -> float:
        seen.append(candidate)
        return accuracy(candidate, x_test, y_test) / 100.0

    config = two_bit_config(backend)
    float_accuracy = accuracy(model, x_test, y_test) / 100.0
    plain = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, config=config, measure_latency=False)
    plain_accuracy = accuracy(plain.model, x_test, y_test) / 100.0
    assert plain_accuracy < float_accuracy - 0.01  # the setting: plain PTQ loses more than max_drop
    result = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, config=config,
                            measure_latency=False, accuracy_fn=digits_accuracy, max_drop=0.01)
    reached = accuracy(result.model, x_test, y_test) / 100.0
    steps = result.report.kept_float
    print(f"\n{backend}: float {float_accuracy:.4f}, 2-bit PTQ {plain_accuracy:.4f}, with accuracy_fn {reached:.4f}; "
          f"float: {[d.partition for d in steps]}")
    assert reached >= float_accuracy - 0.01
    assert 1 <= len(steps) < 4 and [d.step for d in steps] == list(range(1, len(steps) + 1))
    assert steps[0].before == pytest.approx(plain_accuracy) and steps[-1].after == pytest.approx(reached)
    assert all(later.before == earlier.after for earlier, later in zip(steps, steps[1:]))
    assert all(d.after < float_accuracy - 0.01 for d in steps[:-1])  # it stopped as soon as the drop was small enough
    # called on the float program once, then on each candidate as it runs (lowered for onednn)
    assert len(seen) == 2 + len(steps)
    assert not is_quantized(seen[0]) and all(is_quantized(m) for m in seen[1:])
    if backend == "onednn":
        assert result.lowered is not None and seen[-1] is result.lowered
        assert all(any(str(n.target).startswith("onednn.") for n in m.graph.nodes) for m in seen[1:])
    else:
        assert seen[-1] is result.converted
    float_convs = {n.name for n in result.model.graph.nodes if n.target in (aten.conv2d.default, aten.linear.default)
                   and not any("dequantize" in str(a.target) for a in n.all_input_nodes)}
    assert float_convs == {d.partition for d in steps}
    # the report's node lines say the same, also for a layer whose input is still a dequantized activation
    node_reports = {n.name: n for n in result.report.nodes}
    for decision in steps:
        assert not node_reports[decision.partition].quantized
        assert node_reports[decision.partition].reason.startswith("kept float by the accuracy target")
    with torch.no_grad():
        sqnr = sqnr_db(torch.cat([model(*b).flatten() for b in calibration]), torch.cat([result.model(*b).flatten() for b in calibration]))
    assert result.report.accuracy_target == (
        f"accuracy_fn within max_drop=0.01 reached: output SQNR {sqnr:.1f} dB "
        f"over 8 calibration batches, accuracy_fn {reached:.4g} with {len(steps)} of 4 partitions float"
    )


def test_an_unreachable_drop_is_one_line_naming_the_best_value(digits):
    model, data, calibration = digits
    x_test, y_test = data[2], data[3]

    def digits_accuracy(candidate: torch.nn.Module) -> float:
        return accuracy(candidate, x_test, y_test) / 100.0

    config = two_bit_config("reference")
    plain = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, config=config, measure_latency=False)
    with pytest.raises(AccuracyTargetError) as caught:
        qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, config=config,
                       measure_latency=False, accuracy_fn=digits_accuracy, max_drop=0.01, max_float=0)
    message = str(caught.value)
    assert "\n" not in message
    expected = (
        f"accuracy_fn within max_drop=0.01 not reached: the best accuracy_fn value was {digits_accuracy(plain.model):.4g} "
        f"(float {digits_accuracy(model):.4g}, allowed drop 0.01; output SQNR "
    )
    assert message.startswith(expected), message
    assert re.search(r"dB\) with 0 of 4 partitions float \(none\); lower the target, allow more float partitions \(max_float=0\), "
                     r"or pass strict=False to keep the best$", message), message


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(accuracy_fn=3), r"^accuracy_fn must be a callable\(model\) -> float, got 3$"),
        (dict(accuracy_fn=lambda m: 1.0, max_drop=-0.1), r"^max_drop must be a number >= 0 \(the allowed drop of accuracy_fn, e.g. 0.01\), got -0.1$"),
        (dict(accuracy_fn=lambda m: 1.0, max_drop="0.01"), r"^max_drop must be a number >= 0 .*, got '0.01'$"),
        (dict(accuracy_fn=lambda m: 1.0, max_drop=float("nan")), r"^max_drop must be a number >= 0 .*, got nan$"),
        (dict(accuracy_fn=lambda m: "high"), r"^accuracy_fn must return a finite number, got 'high'$"),
        (dict(accuracy_fn=lambda m: float("nan")), r"^accuracy_fn must return a finite number, got nan$"),
        (dict(accuracy_fn=lambda m: None), r"^accuracy_fn must return a finite number, got None$"),
        (dict(accuracy_fn=lambda m: True), r"^accuracy_fn must return a finite number, got True$"),
    ],
)
def test_bad_accuracy_fn_arguments_are_one_line_errors(options, message):
    with pytest.raises(QuantizeError, match=message):
        qcore.quantize(Tiny().eval(), (torch.randn(2, 8),), backend="reference", measure_latency=False, **options)
