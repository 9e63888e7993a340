"""SmoothQuant: the smoothed float graph computes the same function (LayerNorm and linear folds,
the inserted mul, matmul by a constant), the user's model is untouched, bad alpha is one line;
on the outlier MLP ``smooth_quant=0.5`` is at least 6 dB above plain PTQ with every linear
still int8, on both backends; plain PTQ measured beside torchao's."""

from __future__ import annotations

import copy

import pytest
import torch

import qcore
from qcore.accuracy import smooth_quant
from qcore.accuracy.examples import OUTLIER_CHANNELS, OutlierMLP, outlier_mlp_data
from qcore.errors import QuantizeError
from qcore.metrics import sqnr_db
from qcore.testing import requires_backend

BACKENDS = [pytest.param("onednn", marks=requires_backend("onednn")), pytest.param("xnnpack", marks=requires_backend("xnnpack"))]


class Chain(torch.nn.Module):
    """LayerNorm -> linear (fold into the LayerNorm), linear -> linear (fold into the linear),
    gelu -> linear and a matmul by a constant (nothing to fold into: mul with insert_mul)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
        self.c = torch.nn.Linear(16, 8)
        self.w = torch.nn.Parameter(torch.randn(8, 4))
        with torch.no_grad():
            self.norm.weight[[1, 5]] = 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(self.norm(x)))
        return torch.matmul(self.c(torch.nn.functional.gelu(h)), self.w)


def batches(n: int = 4) -> list:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(6, 16, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("insert_mul", [False, True])
def test_smoothed_graph_computes_the_same_in_float_and_leaves_the_input_alone(insert_mul):
    model = Chain().eval()
    exported = torch.export.export(model, batches()[0]).module()
    before = {k: v.clone() for k, v in exported.state_dict().items()}
    smoothed = smooth_quant(exported, batches(), alpha=0.5, insert_mul=insert_mul)
    records = {tuple(r["consumers"]): r["folded_into"] for r in smoothed.meta["qcore_smooth_quant"]}
    # c's output feeds only the matmul by a constant: 1/s goes into c's weight rows and bias
    expected = {("linear",): "layer_norm", ("linear_1",): "linear", ("matmul",): "linear_2"}
    if insert_mul:
        expected[("linear_2",)] = None  # gelu -> linear: nothing to fold into
    assert records == expected
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(smoothed(x), exported(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in exported.state_dict().items())
    muls = [n for n in smoothed.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert len(muls) == (1 if insert_mul else 0)
    # the migrated activation: alpha=0.5 takes the square root of the outlier ratio (40x -> about 6x)
    layer_norm = next(r for r in smoothed.meta["qcore_smooth_quant"] if r["folded_into"] == "layer_norm")
    assert layer_norm["max_abs_before"] > 20 and layer_norm["max_abs_after"] < 8


class NormLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(16)
        self.a = torch.nn.Linear(16, 8)
        with torch.no_grad():
            self.norm.weight[[1, 5]] = 40.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.norm(x))


def test_smoothing_scale_is_the_papers_formula():
    exported = torch.export.export(NormLinear().eval(), batches()[0]).module()
    smoothed = smooth_quant(exported, batches(), alpha=0.5)
    recorded = torch.cat([torch.nn.functional.layer_norm(b[0], (16,), exported.norm.weight, exported.norm.bias) for b in batches()])
    x_max = recorded.abs().amax(dim=0).double()
    w_max = exported.a.weight.abs().amax(dim=0).double()
    scale = (x_max.sqrt() / w_max.sqrt()).float()  # s_j = max|X_j|^0.5 / max|W_j|^0.5
    assert torch.allclose(smoothed.a.weight, exported.a.weight * scale, rtol=1e-5)
    assert torch.allclose(smoothed.norm.weight, exported.norm.weight / scale, rtol=1e-5)
    assert torch.allclose(smoothed.norm.bias, exported.norm.bias / scale, rtol=1e-5, atol=1e-7)
    assert torch.equal(smoothed.a.bias, exported.a.bias)


@pytest.mark.parametrize("alpha", [0, 1, 1.5, "0.5", True, None])
def test_bad_alpha_is_one_line(alpha):
    exported = torch.export.export(Chain().eval(), batches()[0]).module()
    with pytest.raises(ValueError, match=r"^smooth_quant: alpha must be a number in \(0, 1\) \(0.5 is the usual choice\), got "):
        smooth_quant(exported, batches(), alpha=alpha)
    if alpha is not None:
        with pytest.raises(QuantizeError, match=r"alpha must be a number in \(0, 1\)"):
            qcore.quantize(Chain().eval(), batches()[0], backend="reference", smooth_quant=alpha)


def held_out_sqnr(model: torch.nn.Module, quantized: torch.nn.Module) -> float:
    data = outlier_mlp_data(batches=4, seed=7)
    with torch.no_grad():
        reference = torch.cat([model(*b) for b in data])
        actual = torch.cat([quantized(*b) for b in data])
    return sqnr_db(reference, actual)


def int8_linears(result) -> int:
    return sum(1 for n in result.report.nodes if n.op == "aten.linear" and n.quantized)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smooth_quant_beats_plain_ptq_by_6_db_with_every_linear_int8(backend):
    model = OutlierMLP().eval()
    state = copy.deepcopy(model.state_dict())
    calibration = outlier_mlp_data(batches=4)
    plain = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, measure_latency=False)
    smoothed = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, measure_latency=False,
                              smooth_quant=0.5)
    assert int8_linears(plain) == int8_linears(smoothed) == 4
    plain_db, smooth_db = held_out_sqnr(model, plain.model), held_out_sqnr(model, smoothed.model)
    assert smooth_db >= plain_db + 6.0, (plain_db, smooth_db)
    assert smoothed.report.algorithms == [
        "smooth_quant alpha=0.5: smoothed the input of linear_1 (outliers "
        + smoothed.report.algorithms[0].split("(outliers ")[1]
    ]
    assert "1/s folded into layer_norm" in smoothed.report.algorithms[0]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(OUTLIER_CHANNELS) == 4


def torchao_plain_ptq(model: torch.nn.Module, calibration: list) -> torch.nn.Module:
    """torchao 0.18's plain pt2e flow with its XNNPACK quantizer (per-channel symmetric weights)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    exported = torch.export.export(model, calibration[0]).module()
    prepared = prepare_pt2e(exported, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
    return convert_pt2e(prepared)


@pytest.mark.torchao
@requires_backend("xnnpack")
def test_plain_ptq_beside_torchaos_plain_flow():
    pytest.importorskip("torchao")
    model = OutlierMLP().eval()
    calibration = outlier_mlp_data(batches=4)
    ao_db = held_out_sqnr(model, torchao_plain_ptq(model, calibration))
    ours = qcore.quantize(model, calibration[0], backend="xnnpack", calibration=calibration, measure_latency=False)
    ours_db = held_out_sqnr(model, ours.model)
    # the same recipe loses the same to the outliers: within 1 dB of torchao, both far below SmoothQuant
    assert abs(ours_db - ao_db) < 1.0, (ours_db, ao_db)
    smoothed = qcore.quantize(model, calibration[0], backend="xnnpack", calibration=calibration, measure_latency=False,
                              smooth_quant=0.5)
    assert held_out_sqnr(model, smoothed.model) >= ao_db + 6.0
