"""Control flow: models with torch.scan, while_loop and torch.cond quantize inside their bodies.

Each case exports a model whose linear layers sit inside a higher-order op's body, prepares it
with the XNNPACK quantizer (calibrating under no_grad, as calibration runs), converts it, and
checks the q/dq counts in every body and the quantized program's output against the float one
(and against torchao 0.18, which quantizes scan and while_loop bodies the same way).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._higher_order_ops.scan import scan
from torch._higher_order_ops.while_loop import while_loop

import qcore
from qcore.errors import NotExportedError
from qcore.metrics import sqnr_db
from qcore.passes.quantize_subgraphs import body_targets
from qcore.testing.graph_ops import op_counts

qcore_xnnpack = pytest.importorskip("qcore_xnnpack")


def xnnpack():
    return qcore_xnnpack.XNNPACKQuantizer().set_global(qcore_xnnpack.get_symmetric_quantization_config())


class ScanLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        def combine(carry, xs):
            y = self.lin(xs) + carry
            return y, y.clone()

        return scan(combine, torch.zeros(2, 4), x)[1]


class WhileLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        def cond_fn(i, h):
            return i < 3

        def body_fn(i, h):
            return i + 1, self.lin(h).relu()

        return while_loop(cond_fn, body_fn, (torch.tensor(0), x))[1]


class CondLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: self.b(x), (x,))


def _quantize(model, calibration, quantizer=None):
    exported = torch.export.export(model, calibration[0]).module()
    prepared = qcore.prepare_pt2e(exported, quantizer or xnnpack())
    with torch.no_grad():
        for example in calibration:
            prepared(*example)
    return exported, prepared, qcore.convert_pt2e(prepared)


def _body_counts(model):
    return {target: op_counts(model.get_submodule(target)) for target in body_targets(model)}


def _qdq(counts):
    return {k: v for k, v in counts.items() if "quantize" in k}


def test_scan_body_is_quantized_and_runs_close_to_float():
    torch.manual_seed(0)
    model = ScanLinear().eval()
    calibration = [(torch.randn(6, 2, 4),) for _ in range(4)]
    exported, prepared, converted = _quantize(model, calibration)
    body = prepared.get_submodule("scan_combine_graph_0")
    assert sum(1 for n in body.graph.nodes if n.meta.get("qcore_observer")) == 5  # x, w, linear out, carry, add out
    assert op_counts(converted) == {"getitem": 1, "scan": 1, "zeros": 1}
    # linear: input, weight (a placeholder of the body, quantized at run time) and output; add: carry and output
    assert _body_counts(converted) == {
        "scan_combine_graph_0": {"add": 1, "clone": 1, "dequantize_per_tensor": 5, "linear": 1, "quantize_per_tensor": 5}
    }
    x = torch.randn(6, 2, 4)
    with torch.no_grad():
        assert sqnr_db(model(x), converted(x)) > 30
    # the user's exported model and its body are untouched
    assert op_counts(exported.get_submodule("scan_combine_graph_0")) == {"add": 1, "clone": 1, "linear": 1}


def test_while_loop_body_is_quantized_and_cond_fn_stays_float():
    torch.manual_seed(0)
    model = WhileLinear().eval()
    calibration = [(torch.randn(2, 4),) for _ in range(4)]
    _, _, converted = _quantize(model, calibration)
    assert _body_counts(converted) == {
        "while_loop_body_graph_0": {"add": 1, "dequantize_per_tensor": 3, "linear": 1, "quantize_per_tensor": 3, "relu": 1}
    }
    assert op_counts(converted.get_submodule("while_loop_cond_graph_0")) == {"lt": 1}
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert sqnr_db(model(x), converted(x)) > 30


def test_cond_quantizes_both_branches_when_both_are_calibrated():
    torch.manual_seed(0)
    model = CondLinear().eval()
    calibration = [(torch.rand(2, 4) + 0.1,) for _ in range(4)] + [(-torch.rand(2, 4) - 0.1,) for _ in range(4)]
    _, _, converted = _quantize(model, calibration)
    expected = {"dequantize_per_tensor": 3, "linear": 1, "quantize_per_tensor": 3}
    assert _body_counts(converted) == {"true_graph_0": expected, "false_graph_0": expected}
    with torch.no_grad():
        for x in (torch.rand(2, 4) + 0.1, -torch.rand(2, 4) - 0.1):
            assert sqnr_db(model(x), converted(x)) > 30


def test_cond_branch_never_taken_stays_float_with_a_warning():
    torch.manual_seed(0)
    model = CondLinear().eval()
    exported = torch.export.export(model, (torch.rand(2, 4),)).module()
    prepared = qcore.prepare_pt2e(exported, xnnpack())
    with torch.no_grad():
        prepared(torch.rand(2, 4) + 0.1)
    with pytest.warns(qcore.passes.insert_observers.QuantizationWarning, match="saw no calibration data"):
        converted = qcore.convert_pt2e(prepared)
    assert _qdq(op_counts(converted.get_submodule("false_graph_0"))) == {}
    assert _qdq(op_counts(converted.get_submodule("true_graph_0"))) == {"dequantize_per_tensor": 3, "quantize_per_tensor": 3}


def test_nested_while_loop_inside_a_cond_branch():
    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            def looped(x):
                return while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, self.lin(h)), (torch.tensor(0), x))[1]

            return torch.cond(x.sum() > 0, looped, lambda x: x.clone(), (x,))

    torch.manual_seed(0)
    model = Nested().eval()
    _, _, converted = _quantize(model, [(torch.rand(2, 4),) for _ in range(3)])
    branch = converted.get_submodule("true_graph_0")
    inner = body_targets(branch)
    assert inner == ["while_loop_body_graph_0"]
    assert _qdq(op_counts(branch.get_submodule(inner[0]))) == {"dequantize_per_tensor": 3, "quantize_per_tensor": 3}
    x = torch.rand(2, 4)
    with torch.no_grad():
        assert sqnr_db(model(x), converted(x)) > 30


def test_a_real_symbolic_trace_graph_is_still_refused():
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(NotExportedError, match="torch.export"):
        qcore.prepare_pt2e(traced, xnnpack())


class AtenLevelLinearRelu(torch.nn.Module):
    """A module written in aten ops: its symbolic_trace graph is aten-level already."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.ops.aten.relu.default(torch.ops.aten.linear.default(x, self.weight))


def test_an_aten_level_symbolic_trace_graph_is_quantized_as_torchao_does():
    """torchao prepares symbolic_trace graphs that are aten-level enough to annotate; so does qcore
    (a graph that calls modules is refused with the reason, above)."""
    torch.manual_seed(0)
    model = AtenLevelLinearRelu()
    traced = torch.fx.symbolic_trace(model)
    prepared = qcore.prepare_pt2e(traced, xnnpack())
    x = torch.randn(8, 4)
    prepared(x)
    converted = qcore.convert_pt2e(prepared)
    assert _qdq(op_counts(converted)) == {"dequantize_per_tensor": 3, "quantize_per_tensor": 2}
    assert sqnr_db(model(x), converted(x)) > 30
    assert [n.op for n in traced.graph.nodes].count("call_module") == 0  # the user's graph is untouched
    assert not any("quantize" in str(n.target) for n in traced.graph.nodes)


@pytest.mark.torchao
@pytest.mark.parametrize("factory, shape", [(ScanLinear, (6, 2, 4)), (WhileLinear, (2, 4))])
def test_bodies_match_torchao(factory, shape):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as ao_convert, prepare_pt2e as ao_prepare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

        torch.manual_seed(0)
        model = factory().eval()
        calibration = [(torch.randn(*shape),) for _ in range(3)]
        exported = torch.export.export(model, calibration[0]).module()
        ao = ao_prepare(exported, XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
        with torch.no_grad():
            for example in calibration:
                ao(*example)
        ao = ao_convert(ao)
    _, _, ours = _quantize(model, calibration)
    assert {t: _qdq(c) for t, c in _body_counts(ours).items()} == {t: _qdq(c) for t, c in _body_counts(ao).items()}
    x = torch.randn(*shape)
    with torch.no_grad():
        ours_out, ao_out = ours(x), ao(x)
    scale = (ao_out.max() - ao_out.min()) / 255
    assert (ours_out - ao_out).abs().max() <= 2 * scale
