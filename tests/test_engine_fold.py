"""Weights that reach their quantize through ops on constants are folded with it.

``self.weight.t()`` before ``linear``: the transpose and the quantize become one int8 constant
read by a dequantize. The folded program gives exactly what the unfolded one gives.
"""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.testing.graph_ops import op_counts

qcore_xnnpack = pytest.importorskip("qcore_xnnpack")
qd = torch.ops.quantized_decomposed


def xnnpack(per_channel: bool = False):
    return qcore_xnnpack.XNNPACKQuantizer().set_global(qcore_xnnpack.get_symmetric_quantization_config(is_per_channel=per_channel))


class TransposedWeight(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.t())


class ReshapedWeightTwice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):
        w = self.weight.reshape(6, 4)
        return torch.nn.functional.linear(x, w) + torch.nn.functional.linear(x, w * 2)


def _prepare(model, example, quantizer):
    prepared = qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    with torch.no_grad():
        prepared(*example)
        prepared(torch.randn_like(example[0]))
    return prepared


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_a_transposed_weight_is_one_folded_int8_constant(per_channel):
    torch.manual_seed(0)
    example = (torch.randn(3, 4),)
    prepared = _prepare(TransposedWeight(), example, xnnpack(per_channel))
    folded = qcore.convert_pt2e(prepared)
    unfolded = qcore.convert_pt2e(prepared, fold_quantize=False)
    quantize = "quantize_per_channel" if per_channel else "quantize_per_tensor"
    dequantize = "dequantize_per_channel" if per_channel else "dequantize_per_tensor"
    assert op_counts(unfolded)["t"] == 1
    counts = op_counts(folded)
    assert counts.get("t", 0) == 0 and counts.get("quantize_per_channel", 0) == 0
    assert counts["quantize_per_tensor"] == 2  # input and output: the weight's quantize is folded
    assert counts["dequantize_per_tensor"] + counts.get("dequantize_per_channel", 0) == 3
    linear = next(n for n in folded.graph.nodes if n.target is torch.ops.aten.linear.default)
    weight_dq = linear.args[1]
    assert weight_dq.target is getattr(qd, dequantize).default
    constant = getattr(folded, weight_dq.args[0].target)
    assert constant.dtype == torch.int8 and constant.shape == (6, 4)
    assert not any(name == "weight" for name, _ in folded.named_parameters())  # the float weight is gone
    # the constant is the unfolded program's quantize of the transposed weight, bit for bit
    q = next(n for n in unfolded.graph.nodes if n.target is getattr(qd, quantize).default and n.args[0].target is torch.ops.aten.t.default)
    args = [getattr(unfolded, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in q.args[1:]]
    assert torch.equal(constant, q.target(prepared.weight.detach().t(), *args))
    x = torch.randn(3, 4)
    assert torch.equal(folded(x), unfolded(x))


def test_a_weight_reshaped_once_and_used_twice_folds_both_uses():
    torch.manual_seed(0)
    example = (torch.randn(3, 4),)
    prepared = _prepare(ReshapedWeightTwice(), example, xnnpack())
    folded = qcore.convert_pt2e(prepared)
    unfolded = qcore.convert_pt2e(prepared, fold_quantize=False)
    counts = op_counts(folded)
    assert counts.get("reshape", counts.get("view", 0)) == 0 and counts.get("mul", 0) == 0
    int8_constants = [n for n, b in folded.named_buffers() if b.dtype == torch.int8]
    assert len(int8_constants) == 2
    x = torch.randn(3, 4)
    assert torch.equal(folded(x), unfolded(x))


def test_a_quantize_of_an_activation_is_never_folded():
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x * 2, self.weight.t())

    torch.manual_seed(0)
    example = (torch.randn(3, 4),)
    prepared = _prepare(M(), example, xnnpack())
    folded, unfolded = qcore.convert_pt2e(prepared), qcore.convert_pt2e(prepared, fold_quantize=False)

    def quantized_inputs(gm):
        return [q.args[0].name for q in gm.graph.nodes if q.target is qd.quantize_per_tensor.default]

    # the scalar 2 became a constant tensor (XNNPACK's transform) and is folded like the weight
    assert quantized_inputs(unfolded) == ["x", "_tensor_constant_0", "mul", "t", "linear"]
    assert quantized_inputs(folded) == ["x", "mul", "linear"]
