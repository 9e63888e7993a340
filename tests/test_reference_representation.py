"""``convert_pt2e(..., use_reference_representation=True)``: quantized islands become integer
arithmetic.

For each pattern: the reference graph keeps no ``dequantize -> op -> quantize`` island for it,
its output matches the q/dq graph within one quantization step, and it stays close to the float
model (SQNR >= 25 dB).
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.out_dtype import out_dtype
from torch.fx import GraphModule, Node

import qcore
from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.observers import MinMaxObserver, PerChannelMinMaxObserver, PlaceholderObserver
from qcore.passes.qdq_ops import DEQUANTIZE_OPS, QUANTIZE_OPS, qd
from qcore.passes.reference_representation import REFERENCE_META
from qcore.quantizer import Quantizer
from qcore.spec import DerivedQuantizationSpec, QuantizationSpec, SharedQuantizationSpec
from qcore.testing.conformance import sqnr_db

aten = torch.ops.aten

# ----------------------------------------------------------------------------- specs and quantizer
INT8_ACT = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=MinMaxObserver,
    quant_min=-128,
    quant_max=127,
    qscheme=torch.per_tensor_affine,
)
UINT8_ACT = QuantizationSpec(
    dtype=torch.uint8,
    observer_or_fake_quant_ctr=MinMaxObserver,
    quant_min=0,
    quant_max=255,
    qscheme=torch.per_tensor_affine,
)
PER_CHANNEL_WEIGHT = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=PerChannelMinMaxObserver,
    quant_min=-127,
    quant_max=127,
    qscheme=torch.per_channel_symmetric,
    ch_axis=0,
)
PER_TENSOR_WEIGHT = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=MinMaxObserver,
    quant_min=-127,
    quant_max=127,
    qscheme=torch.per_tensor_symmetric,
)
DYNAMIC_ACT = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=PlaceholderObserver,
    quant_min=-128,
    quant_max=127,
    qscheme=torch.per_tensor_affine,
    is_dynamic=True,
)

WEIGHTED_OPS = (aten.linear.default, aten.conv2d.default)
POOL_OPS = (aten.max_pool2d.default, aten.max_pool2d_with_indices.default)


def _bias_scale(observers: list) -> tuple[torch.Tensor, torch.Tensor]:
    act_scale, _ = observers[0].calculate_qparams()
    weight_scale, _ = observers[1].calculate_qparams()
    scale = (act_scale * weight_scale).float()
    return scale, torch.zeros_like(scale, dtype=torch.int32)


class ReferenceTestQuantizer(Quantizer):
    """Annotates linear, conv2d, add, mul, max_pool2d (and their trailing relu) with int8 specs.

    ``dynamic``: linear inputs get a run-time (dynamic) spec and no output spec.
    ``pool_output``: "shared" reuses the pool input's observer; "own" gives it its own.
    ``int32_bias``: linear/conv bias gets a derived int32 spec (scale = act x weight scale).
    ``weighted_outputs``: False leaves linear/conv outputs float (as x86-style quantizers do).
    """

    def __init__(
        self,
        act: QuantizationSpec = INT8_ACT,
        weight: QuantizationSpec = PER_CHANNEL_WEIGHT,
        dynamic: bool = False,
        pool_output: str = "shared",
        int32_bias: bool = False,
        binary_ops: tuple = (aten.add.Tensor,),
        weighted_outputs: bool = True,
    ) -> None:
        self.act = DYNAMIC_ACT if dynamic else act
        self.weight = weight
        self.dynamic = dynamic
        self.pool_output = pool_output
        self.int32_bias = int32_bias
        self.binary_ops = binary_ops
        self.weighted_outputs = weighted_outputs

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or is_annotated(node):
                continue
            if node.target in WEIGHTED_OPS:
                self._weighted(node)
            elif self.dynamic:
                continue
            elif node.target in self.binary_ops:
                for arg in node.args[:2]:
                    if isinstance(arg, Node):
                        annotate_input(node, arg, self.act)
                self._output(node)
            elif node.target in POOL_OPS:
                self._pool(node)
        return model

    def _weighted(self, node: Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        annotate_input(node, x, self.act)
        annotate_input(node, weight, self.weight)
        if self.int32_bias and isinstance(bias, Node):
            annotate_input(
                node,
                bias,
                DerivedQuantizationSpec(
                    derived_from=[(x, node), (weight, node)],
                    derive_qparams_fn=_bias_scale,
                    dtype=torch.int32,
                    quant_min=-(2**31),
                    quant_max=2**31 - 1,
                    qscheme=self.weight.qscheme,
                    ch_axis=self.weight.ch_axis,
                ),
            )
        if self.dynamic or not self.weighted_outputs:
            mark_annotated([node])
        else:
            self._output(node)

    def _output(self, node: Node) -> None:
        """Quantize the op's output, or its relu's when a relu follows (fused)."""
        users = list(node.users)
        if len(users) == 1 and users[0].target is aten.relu.default:
            annotate_output(users[0], self.act)
            mark_annotated([node, users[0]])
        else:
            annotate_output(node, self.act)
            mark_annotated([node])

    def _pool(self, node: Node) -> None:
        x = node.args[0]
        annotate_input(node, x, self.act)
        output = SharedQuantizationSpec((x, node)) if self.pool_output == "shared" else self.act
        if node.target is aten.max_pool2d_with_indices.default:
            values = next(u for u in node.users if u.target is operator.getitem and u.args[1] == 0)
            annotate_output(values, output)
            mark_annotated([node, values])
        else:
            annotate_output(node, output)
            mark_annotated([node])

    def validate(self, model: GraphModule) -> None:
        return None


# ----------------------------------------------------------------------------- models
class LinearModel(torch.nn.Module):
    def __init__(self, bias: bool = True, relu: bool = False) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16, 8, bias=bias)
        self.relu = relu

    def forward(self, x):
        y = self.linear(x)
        return torch.relu(y) if self.relu else y


class ConvModel(torch.nn.Module):
    def __init__(self, relu: bool = False, **conv_kwargs) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, **conv_kwargs)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


class AddModel(torch.nn.Module):
    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x, y):
        z = x + y
        return torch.relu(z) if self.relu else z


class MulModel(torch.nn.Module):
    def forward(self, x, y):
        return x * y


class MaxPoolModel(torch.nn.Module):
    def __init__(self, with_indices: bool = False) -> None:
        super().__init__()
        self.with_indices = with_indices

    def forward(self, x):
        if self.with_indices:
            return F.max_pool2d(x, 2, return_indices=True)[0]
        return F.max_pool2d(x, 3, stride=2, padding=1)


class DynamicModel(torch.nn.Module):
    """Two linears reading the same input: one dynamically quantized input, two consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(16, 8)
        self.second = torch.nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.first(x), self.second(x)


class ChainModel(torch.nn.Module):
    """conv -> add -> relu -> max_pool -> flatten -> linear: every pattern in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.linear = torch.nn.Linear(64, 5)

    def forward(self, x, y):
        z = torch.relu(self.conv(x) + y)
        z = F.max_pool2d(z, 2)
        return self.linear(torch.flatten(z, 1))


# ----------------------------------------------------------------------------- helpers
def _seeded(seed: int, *shapes: tuple) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=generator) for shape in shapes)


def _quantize(model: torch.nn.Module, shapes: list, quantizer: Quantizer, fold_quantize: bool = True):
    """(q/dq model, reference model, evaluation inputs, float outputs)."""
    torch.manual_seed(0)
    model = model.eval()
    example = _seeded(0, *shapes)
    exported = torch.export.export(model, example).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    inputs = _seeded(99, *shapes)
    for seed in range(1, 4):
        prepared(*_seeded(seed, *shapes))
    prepared(*inputs)  # calibrated on the evaluation data too: the SQNR measures rounding, not clipping
    qdq = qcore.convert_pt2e(prepared, fold_quantize=fold_quantize)
    reference = qcore.convert_pt2e(prepared, use_reference_representation=True, fold_quantize=fold_quantize)
    with torch.no_grad():
        expected = model(*inputs)
    return qdq, reference, inputs, expected


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _count(gm: GraphModule, targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def _islands(gm: GraphModule, targets) -> int:
    """Float ops in ``targets`` that read a dequantize (the q/dq form of a quantized op)."""
    return sum(
        1
        for n in gm.graph.nodes
        if n.op == "call_function"
        and n.target in targets
        and any(a.op == "call_function" and a.target in DEQUANTIZE_OPS for a in n.all_input_nodes)
    )


def _output_steps(gm: GraphModule) -> list[Optional[float]]:
    """The quantization step of each model output (None for a float output)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    steps = []
    for producer in _outputs(output.args[0]):
        dq = producer if producer.target in DEQUANTIZE_OPS else None
        steps.append(float(dq.args[1]) if dq is not None and not isinstance(dq.args[1], Node) else None)
    return steps


def _check_numerics(qdq: GraphModule, reference: GraphModule, inputs: tuple, expected, min_sqnr: float = 25.0) -> None:
    with torch.no_grad():
        got_qdq, got_ref = _outputs(qdq(*inputs)), _outputs(reference(*inputs))
    for want, from_qdq, from_ref, step in zip(_outputs(expected), got_qdq, got_ref, _output_steps(qdq)):
        if step is None:  # float output (dynamic linear)
            torch.testing.assert_close(from_ref, from_qdq, rtol=1e-4, atol=1e-4)
        else:
            assert (from_ref - from_qdq).abs().max().item() <= step * 1.001, "more than one quantization step apart"
        assert sqnr_db(want, from_ref) >= min_sqnr


def _node(gm: GraphModule, target) -> Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


# ----------------------------------------------------------------------------- one test per pattern
STATIC_CASES = {
    "linear": (LinearModel(), [(4, 16)], WEIGHTED_OPS[:1], {"linear": 1}),
    "linear_3d_no_bias": (LinearModel(bias=False), [(2, 3, 16)], WEIGHTED_OPS[:1], {"linear": 1}),
    "linear_relu": (LinearModel(relu=True), [(4, 16)], WEIGHTED_OPS[:1], {"linear_relu": 1}),
    "conv2d": (ConvModel(stride=2, padding=1), [(2, 4, 9, 9)], WEIGHTED_OPS[1:], {"conv2d": 1}),
    "conv2d_groups_dilation": (
        ConvModel(groups=2, dilation=2, bias=False),
        [(1, 4, 10, 10)],
        WEIGHTED_OPS[1:],
        {"conv2d": 1},
    ),
    "conv2d_relu": (ConvModel(relu=True, padding=1), [(2, 4, 8, 8)], WEIGHTED_OPS[1:], {"conv2d_relu": 1}),
    "add": (AddModel(), [(2, 4, 5, 5), (2, 4, 5, 5)], (aten.add.Tensor,), {"add": 1}),
    "add_broadcast": (AddModel(), [(2, 4, 5, 5), (1, 4, 1, 5)], (aten.add.Tensor,), {"add": 1}),
    "add_relu": (AddModel(relu=True), [(2, 4, 5, 5), (2, 4, 5, 5)], (aten.add.Tensor,), {"add_relu": 1}),
    "max_pool2d": (MaxPoolModel(), [(2, 4, 9, 9)], POOL_OPS, {"max_pool2d": 1}),
    "max_pool2d_with_indices": (MaxPoolModel(with_indices=True), [(2, 4, 8, 8)], POOL_OPS, {"max_pool2d": 1}),
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_static_pattern_becomes_integer_arithmetic(case):
    model, shapes, ops, expected_counts = STATIC_CASES[case]
    qdq, reference, inputs, expected = _quantize(model, shapes, ReferenceTestQuantizer())

    assert _islands(qdq, ops) == 1
    assert _islands(reference, ops) == 0
    assert _count(reference, DEQUANTIZE_OPS) == 1  # only the model output's
    assert _count(reference, QUANTIZE_OPS) == len(shapes)  # only the model inputs'
    assert reference.meta[REFERENCE_META] == expected_counts
    _check_numerics(qdq, reference, inputs, expected)


@pytest.mark.parametrize("case", ["linear", "conv2d"])
def test_per_tensor_weight(case):
    model, shapes, ops, expected_counts = STATIC_CASES[case]
    qdq, reference, inputs, expected = _quantize(model, shapes, ReferenceTestQuantizer(weight=PER_TENSOR_WEIGHT))
    assert _islands(reference, ops) == 0
    assert reference.meta[REFERENCE_META] == expected_counts
    _check_numerics(qdq, reference, inputs, expected)


def test_max_pool2d_requantizes_when_output_qparams_differ():
    qdq, reference, inputs, expected = _quantize(MaxPoolModel(), [(2, 4, 9, 9)], ReferenceTestQuantizer(pool_output="own"))
    q_out = next(n for n in qdq.graph.nodes if n.target is qd.quantize_per_tensor.default and n.args[0].target in POOL_OPS)
    dq_in = _node(qdq, qd.dequantize_per_tensor.default)
    assert q_out.args[1:3] != dq_in.args[1:3]  # the output has its own scale / zero point
    assert _islands(reference, POOL_OPS) == 0
    pool = _node(reference, aten.max_pool2d.default)
    assert pool.args[0].target is qd.quantize_per_tensor.default  # pools the int8 values
    assert _count(reference, (aten.round.default,)) == 1
    _check_numerics(qdq, reference, inputs, expected)


def test_dynamic_linear():
    qdq, reference, inputs, expected = _quantize(DynamicModel(), [(2, 5, 16)], ReferenceTestQuantizer(dynamic=True))
    assert _islands(qdq, WEIGHTED_OPS) == 2
    assert _islands(reference, WEIGHTED_OPS) == 0
    assert _count(reference, DEQUANTIZE_OPS) == 0
    assert _count(reference, (qd.choose_qparams.tensor,)) == 1  # qparams still chosen at run time
    assert _count(reference, (qd.quantize_per_tensor.tensor,)) == 1
    assert reference.meta[REFERENCE_META] == {"dynamic_linear": 2}
    _check_numerics(qdq, reference, inputs, expected)


# ----------------------------------------------------------------------------- what the graph says
@pytest.mark.parametrize("model, shapes, name", [
    (ConvModel(relu=True, padding=1), [(2, 4, 8, 8)], "conv2d_float_output"),
    (LinearModel(), [(4, 16)], "linear_float_output"),
])
def test_float_output(model, shapes, name):
    """Quantized input and weight, float output: the integer accumulator is scaled back to float."""
    quantizer = ReferenceTestQuantizer(act=UINT8_ACT, weighted_outputs=False)
    qdq, reference, inputs, expected = _quantize(model, shapes, quantizer)
    assert _islands(qdq, WEIGHTED_OPS) == 1
    assert _islands(reference, WEIGHTED_OPS) == 0
    assert reference.meta[REFERENCE_META] == {name: 1}
    assert _count(reference, (aten.relu.default,)) == _count(qdq, (aten.relu.default,))  # the float relu stays
    x_scale = _node(qdq, qd.dequantize_per_tensor.default).args[1]
    weight_scale = getattr(qdq, _node(qdq, qd.dequantize_per_channel.default).args[1].target).max().item()
    with torch.no_grad():
        got_qdq, got_ref = qdq(*inputs), reference(*inputs)
    assert got_ref.dtype is torch.float32
    # the bias is rounded to the accumulator's step x_scale * w_scale: at most half a step off
    torch.testing.assert_close(got_ref, got_qdq, rtol=1e-5, atol=x_scale * weight_scale)
    assert sqnr_db(expected, got_ref) >= 25


def test_linear_graph_is_int16_operands_int32_accumulator_int32_bias():
    _, reference, _, _ = _quantize(LinearModel(), [(4, 16)], ReferenceTestQuantizer())
    accumulate = _node(reference, out_dtype)
    assert accumulate.args[:2] == (aten.linear.default, torch.int32)
    x, weight = accumulate.args[2:4]
    assert x.target is aten.sub.Tensor and x.args[0].kwargs == {"dtype": torch.int16}
    assert weight.kwargs == {"dtype": torch.int16}  # symmetric weight: no zero point to subtract
    assert weight.args[0].op == "get_attr" and getattr(reference, weight.args[0].target).dtype is torch.int8
    bias_add = next(iter(accumulate.users))
    assert bias_add.target is aten.add.Tensor and bias_add.args[1].kwargs == {"dtype": torch.int32}
    final = next(n for n in reference.graph.nodes if n.target is aten._to_copy.default and n.kwargs["dtype"] is torch.int8)
    assert final.args[0].target is aten.clamp.default


def test_literals_carry_over_from_the_matched_graph():
    model = ConvModel(stride=2, padding=1, dilation=1, groups=2)
    qdq, reference, _, _ = _quantize(model, [(2, 4, 9, 9)], ReferenceTestQuantizer())
    conv = _node(qdq, aten.conv2d.default)
    accumulate = _node(reference, out_dtype)
    assert accumulate.args[5:] == tuple(conv.args[3:]) == ([2, 2], [1, 1], [1, 1], 2)
    x_dq = conv.args[0]
    q_out = next(iter(conv.users))
    _, x_scale, x_zero_point, _, _, _ = x_dq.args
    _, out_scale, out_zero_point, out_min, out_max, out_dtype_ = q_out.args
    centered_x = accumulate.args[2]
    assert centered_x.args[1] == x_zero_point
    clamp = _node(reference, aten.clamp.default)
    assert clamp.args[1:] == (out_min, out_max)
    assert clamp.args[0].args[1] == out_zero_point
    scale_mul = next(n for n in reference.graph.nodes if n.target is aten.mul.Tensor and n.args[1] == x_scale)
    assert scale_mul.args[0].op == "get_attr"  # the per-channel weight scales
    assert any(n.target is aten.div.Tensor and n.args[1] == out_scale for n in reference.graph.nodes)


def test_relu_clamps_at_the_output_zero_point():
    _, reference, _, _ = _quantize(LinearModel(relu=True), [(4, 16)], ReferenceTestQuantizer())
    clamp = _node(reference, aten.clamp.default)
    out_zero_point = clamp.args[0].args[1]
    assert clamp.args[1] == max(-128, out_zero_point)
    assert _count(reference, (aten.relu.default,)) == 0


def test_int32_bias_is_used_as_is():
    qdq, reference, inputs, expected = _quantize(LinearModel(), [(4, 16)], ReferenceTestQuantizer(int32_bias=True))
    int32_dq = [n for n in qdq.graph.nodes if n.target in DEQUANTIZE_OPS and n.args[-1] is torch.int32]
    assert len(int32_dq) == 1
    assert not any(n.target in DEQUANTIZE_OPS and n.args[-1] is torch.int32 for n in reference.graph.nodes)
    bias_add = next(iter(_node(reference, out_dtype).users))
    bias = bias_add.args[1]
    assert bias.op == "get_attr" and getattr(reference, bias.target).dtype is torch.int32
    assert _count(reference, (aten.div.Tensor,)) == 1  # only the requantize multiplier
    _check_numerics(qdq, reference, inputs, expected)


def test_uint8_activations():
    qdq, reference, inputs, expected = _quantize(ChainModel(), [(2, 3, 8, 8), (2, 4, 8, 8)], ReferenceTestQuantizer(act=UINT8_ACT))
    assert reference.meta[REFERENCE_META] == {"conv2d": 1, "add_relu": 1, "max_pool2d": 1, "linear": 1}
    assert _islands(reference, WEIGHTED_OPS + (aten.add.Tensor,) + POOL_OPS) == 0
    final = [n for n in reference.graph.nodes if n.target is aten._to_copy.default and n.kwargs["dtype"] is torch.uint8]
    assert len(final) == 3  # conv, add_relu, linear outputs (max_pool keeps uint8)
    _check_numerics(qdq, reference, inputs, expected)


def test_every_pattern_in_one_graph():
    qdq, reference, inputs, expected = _quantize(ChainModel(), [(2, 3, 8, 8), (2, 4, 8, 8)], ReferenceTestQuantizer())
    assert reference.meta[REFERENCE_META] == {"conv2d": 1, "add_relu": 1, "max_pool2d": 1, "linear": 1}
    assert _islands(reference, WEIGHTED_OPS + (aten.add.Tensor,) + POOL_OPS) == 0
    assert _count(reference, (aten.relu.default,)) == 0
    _check_numerics(qdq, reference, inputs, expected)


def test_without_fold_quantize():
    qdq, reference, inputs, expected = _quantize(
        ChainModel(), [(2, 3, 8, 8), (2, 4, 8, 8)], ReferenceTestQuantizer(), fold_quantize=False
    )
    assert reference.meta[REFERENCE_META] == {"conv2d": 1, "add_relu": 1, "max_pool2d": 1, "linear": 1}
    assert _islands(reference, WEIGHTED_OPS + (aten.add.Tensor,) + POOL_OPS) == 0
    weight_q = [n for n in reference.graph.nodes if n.target is qd.quantize_per_channel.default]
    assert len(weight_q) == 2 and all(n.args[0].op == "get_attr" for n in weight_q)  # weights quantized in the graph
    _check_numerics(qdq, reference, inputs, expected)


def test_unsupported_island_keeps_qdq_and_is_logged(caplog):
    quantizer = ReferenceTestQuantizer(binary_ops=(aten.add.Tensor, aten.mul.Tensor))
    with caplog.at_level(logging.INFO, logger="qcore.passes.reference_representation"):
        qdq, reference, inputs, expected = _quantize(MulModel(), [(2, 8), (2, 8)], quantizer)
    assert _islands(reference, (aten.mul.Tensor,)) == 1
    assert reference.meta[REFERENCE_META] == {}
    assert "keeps its quantize/dequantize ops" in caplog.text and "mul" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(reference(*inputs), qdq(*inputs), rtol=0, atol=0)


def test_reference_model_exports_again():
    _, reference, inputs, _ = _quantize(ChainModel(), [(2, 3, 8, 8), (2, 4, 8, 8)], ReferenceTestQuantizer())
    again = torch.export.export(reference, inputs).module()
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs), reference(*inputs), rtol=0, atol=0)


@pytest.mark.slow  # torch.compile
def test_reference_model_compiles():
    _, reference, inputs, _ = _quantize(ChainModel(), [(2, 3, 8, 8), (2, 4, 8, 8)], ReferenceTestQuantizer())
    compiled = torch.compile(reference)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), reference(*inputs), rtol=0, atol=0)


def test_unused_weight_qparams_are_dropped():
    qdq, reference, _, _ = _quantize(LinearModel(), [(4, 16)], ReferenceTestQuantizer())
    zero_point_attr = _node(qdq, qd.dequantize_per_channel.default).args[2].target
    assert hasattr(qdq, zero_point_attr)  # the q/dq model keeps its own
    assert not hasattr(reference, zero_point_attr)  # symmetric weight: nothing reads it any more


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y)) + y
        return self.fc(torch.flatten(F.max_pool2d(y, 2), 1))


@pytest.mark.torchao
@pytest.mark.slow  # torchao's rewrite exports a dozen patterns: ~20 s
def test_at_least_as_close_to_qdq_as_torchao():
    """Same quantizer (torchao's XNNPACK one) through both flows: qcore's reference graph is within
    one step of its q/dq graph and differs from it on no more outputs than torchao's does."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as ao_convert_pt2e
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e as ao_prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    torch.manual_seed(0)
    model = SmallCNN().eval()
    (x,) = _seeded(7, (8, 3, 16, 16))
    mismatches = {}
    for flow, prepare, convert in (
        ("torchao", ao_prepare_pt2e, ao_convert_pt2e),
        ("qcore", qcore.prepare_pt2e, qcore.convert_pt2e),
    ):
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare(torch.export.export(model, (x,)).module(), quantizer)
        prepared(x)
        qdq = convert(copy_of(prepared))
        reference = convert(copy_of(prepared), use_reference_representation=True)
        assert _islands(reference, WEIGHTED_OPS + (aten.add.Tensor,)) == 0
        with torch.no_grad():
            difference = (reference(x) - qdq(x)).abs()
        step = _output_steps(qdq)[0]
        assert difference.max().item() <= step * 1.001
        mismatches[flow] = int((difference > step / 2).sum())
    assert mismatches["qcore"] <= mismatches["torchao"]


def copy_of(model: GraphModule) -> GraphModule:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
def test_add_is_fixed_point_integer_arithmetic_in_the_out_dtype_form(relu):
    """torchao's add_relu reference has 2 out_dtype nodes (one rescale per input); qcore's add and
    add_relu are that form with integer multipliers and one rounding shift: every node after the
    input casts is integer, and the result is within half a step (plus rounding ties) of q/dq."""
    from torch._higher_order_ops.out_dtype import out_dtype

    qdq, reference, inputs, expected = _quantize(AddModel(relu=relu), [(2, 4, 5, 5), (2, 4, 5, 5)], ReferenceTestQuantizer())
    muls = [n for n in reference.graph.nodes if n.target is out_dtype]
    assert len(muls) == 2
    assert all(n.args[:2] == (aten.mul.Tensor, torch.int32) and isinstance(n.args[3], int) for n in muls)
    assert _count(reference, (aten.round.default, aten.mul.Tensor)) == 0  # no float rescale left
    assert _count(reference, (aten.__rshift__.Scalar,)) == 1
    with torch.no_grad():
        difference = (reference(*inputs) - qdq(*inputs)).abs()
    step = _output_steps(qdq)[0]
    assert difference.max().item() <= step * 1.001
    assert int((difference > step / 2).sum()) <= difference.numel() // 100  # ties and fixed-point error only
