"""Quant lift-up: a quantize moves above the transpose / permute / view / reshape ops feeding it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcore.graph_copy import copy_graph_module
from qcore.records import LoweringContext

from _onednn_helpers import aten, assert_close_to_reference, calls, count, counters, lower, onednn, qd, quantize

from qcore_onednn_x86.lowering.lift_quantize_over_views import lift_quantize_over_views

VIEWS = (aten.view.default, aten.reshape.default, aten.permute.default, aten.transpose.int)


class LinearPermuteLinear(torch.nn.Module):
    """linear ─▶ view ─▶ permute ─▶ (q ─▶ dq) ─▶ linear, as in an attention block's head split."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(4, 8)

    def forward(self, x):
        y = self.a(x).view(2, 3, 4, 4).permute(0, 2, 1, 3)
        return self.b(y)


class AttentionOutput(torch.nn.Module):
    """sdpa ─▶ transpose ─▶ reshape ─▶ (q ─▶ dq) ─▶ linear: the output projection of attention."""

    def __init__(self):
        super().__init__()
        self.out = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        attn = F.scaled_dot_product_attention(q, k, v)  # [b, heads, s, d]
        return self.out(attn.transpose(1, 2).reshape(2, 5, 16))


def run_pass(converted):
    model, _ = copy_graph_module(converted, copy_tensors=False)
    context = LoweringContext(backend="onednn")
    changed = lift_quantize_over_views(model, context)
    return model, context, changed


def test_quantize_moves_above_the_view_chain_and_the_outputs_stay_bit_identical():
    example = (torch.randn(2, 3, 16),)
    converted = quantize(LinearPermuteLinear(), example)
    lifted, context, changed = run_pass(converted)
    assert changed and context.counters["quant_lift_up_count"] == 1
    (quant,) = [n for n in calls(lifted, qd.quantize_per_tensor.default) if n.args[0].target == aten.linear.default]
    # linear ─▶ q ─▶ view ─▶ permute ─▶ dq, the q's arguments unchanged
    view = next(iter(quant.users))
    permute = next(iter(view.users))
    assert (view.target, permute.target) == (aten.view.default, aten.permute.default)
    assert all(user.target == qd.dequantize_per_tensor.default for user in permute.users)
    (original,) = [n for n in calls(converted, qd.quantize_per_tensor.default) if n.args[0].target == aten.permute.default]
    assert quant.args[1:] == original.args[1:]
    assert permute.meta["val"].dtype == torch.uint8 and permute.meta["val"].shape == (2, 4, 3, 4)
    with torch.no_grad():
        assert torch.equal(converted(*example), lifted(*example))
    # the user's converted model is not touched
    assert not [n for n in calls(converted, qd.quantize_per_tensor.default) if n.args[0].target == aten.linear.default]


def test_lowered_attention_output_reshapes_uint8_and_matches_the_qdq_model():
    example = tuple(torch.randn(2, 4, 5, 4) for _ in range(3))
    converted = quantize(AttentionOutput(), example)
    lowered = lower(converted, example)
    assert counters(lowered)["quant_lift_up_count"] == 1
    (qlinear,) = calls(lowered, onednn.qlinear_pointwise.default)
    reshape = qlinear.args[0]
    assert reshape.target == aten.reshape.default
    transpose = reshape.args[0]
    assert transpose.target == aten.transpose.int
    assert transpose.args[0].target == qd.quantize_per_tensor.default  # the reshape copies uint8
    assert transpose.args[0].args[0].target == aten.scaled_dot_product_attention.default
    assert count(lowered, qd.dequantize_per_tensor.default) == 0
    assert_close_to_reference(converted, lowered, example)


class PermuteUsedTwice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(4, 8)

    def forward(self, x):
        y = self.a(x).view(2, 3, 4, 4).permute(0, 2, 1, 3)
        return self.b(y), y * 2


def test_nothing_moves_when_a_view_in_the_chain_has_another_user():
    example = (torch.randn(2, 3, 16),)
    converted = quantize(PermuteUsedTwice(), example)
    lifted, context, changed = run_pass(converted)
    assert not changed and "quant_lift_up_count" not in context.counters
    assert str(lifted.graph) == str(converted.graph)


def test_nothing_moves_when_the_scale_is_a_graph_node():
    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(0.1))
            self.register_buffer("zero_point", torch.tensor(3))

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.relu.default, (x,))
    t = graph.call_function(aten.transpose.int, (y, 0, 1))
    scale, zero_point = graph.get_attr("scale"), graph.get_attr("zero_point")
    q = graph.call_function(qd.quantize_per_tensor.tensor, (t, scale, zero_point, 0, 255, torch.uint8))
    graph.output(graph.call_function(qd.dequantize_per_tensor.tensor, (q, scale, zero_point, 0, 255, torch.uint8)))
    model = torch.fx.GraphModule(Root(), graph)
    before = str(model.graph)
    assert lift_quantize_over_views(model, LoweringContext(backend="onednn")) is False
    assert str(model.graph) == before


def test_a_dequantize_producer_is_left_to_the_uint8_reshape_lowering():
    class PoolFlattenLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4 * 3 * 3, 5)

        def forward(self, x):
            y = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(y.reshape(y.shape[0], -1))

    example = (torch.randn(2, 3, 8, 8),)
    converted = quantize(PoolFlattenLinear(), example)
    lowered = lower(converted, example)
    assert "quant_lift_up_count" not in counters(lowered)
    assert counters(lowered)["qreshape_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example)
