"""Dequantize promotion and conv / linear weight prepacking."""

from __future__ import annotations

import functools

import pytest
import torch

from qcore.coverage import NothingAnnotatedWarning
from qcore.records import LoweringContext

from _onednn_helpers import (
    aten, assert_close_to_reference, calls, count, counters, lower, onednn, qd, qdq_count, quantize, x86_quantizer,
)

from qcore_onednn_x86 import get_default_x86_inductor_quantization_config
from qcore_onednn_x86.lowering.prepack_conv_weights import prepack_conv_weights
from qcore_onednn_x86.lowering.promote_dequantize import promote_dequantize


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.b = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.a(x) + 0, self.b(x) + 0


def _merge_dequantizes(converted):
    """Make both convs read one dequantize (what a convert without duplication would give)."""
    dqs = [n for n in calls(converted, qd.dequantize_per_tensor.default) if n.args[0].target == qd.quantize_per_tensor.default]
    first = dqs[0]
    for other in dqs[1:]:
        if other.args == first.args:
            other.replace_all_uses_with(first)
            converted.graph.erase_node(other)
    converted.recompile()
    return first


def test_promote_dequantize_gives_each_conv_its_own_dequantize():
    example = (torch.randn(1, 3, 8, 8),)
    converted = quantize(TwoConvs(), example)
    shared = _merge_dequantizes(converted)
    assert len(shared.users) == 2
    reference = converted(*example)
    context = LoweringContext(backend="onednn")
    assert promote_dequantize(converted, context) is True
    assert context.counters["dequant_promotion_matcher_count"] == 1
    assert all(len(n.users) == 1 for n in calls(converted, qd.dequantize_per_tensor.default))
    for expected, actual in zip(reference, converted(*example)):
        assert torch.equal(expected, actual)
    # a shared dq blocks prepacking; after promotion both convs prepack
    lowered = lower(converted, example)
    assert count(lowered, onednn.qconv2d_pointwise.default) == 2


def test_prepack_refuses_a_dequantize_with_two_users():
    example = (torch.randn(1, 3, 8, 8),)
    converted = quantize(TwoConvs(), example)
    _merge_dequantizes(converted)
    assert prepack_conv_weights(converted, LoweringContext(backend="onednn")) is False


class Conv(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, **kwargs)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "padding": 1}, {"groups": 1, "dilation": 2, "bias": False}])
def test_conv_prepack_replaces_dq_conv_by_one_qconv(kwargs):
    example = (torch.randn(2, 3, 12, 12),)
    converted = quantize(Conv(**kwargs), example)
    lowered = lower(converted, example)
    (qconv,) = calls(lowered, onednn.qconv2d_pointwise.default)
    assert qconv.args[11:15] == (1.0, 0, torch.float32, "none")
    assert qconv.args[3].op == "get_attr" and getattr(lowered, qconv.args[3].target).is_mkldnn
    assert count(lowered, aten.conv2d.default) == 0
    assert count(lowered, qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default) == 0
    assert counters(lowered)["qconv2d_weight_prepack_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example, atol=1e-5)


def test_depthwise_conv_prepacks():
    model = torch.nn.Conv2d(8, 8, 3, groups=8, padding=1)
    example = (torch.randn(2, 8, 10, 10),)
    converted = quantize(model, example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qconv2d_pointwise.default) == 1
    assert_close_to_reference(converted, lowered, example, atol=1e-5)


def test_transposed_conv_and_int8_activations_stay_as_they_are():
    model = torch.nn.ConvTranspose2d(3, 4, 3)
    example = (torch.randn(1, 3, 6, 6),)
    with pytest.warns(NothingAnnotatedWarning, match="annotated none of the 1 quantizable ops"):  # no x86 conv_transpose recipe
        converted = quantize(model, example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qconv2d_pointwise.default) == 0
    # int8 activations: oneDNN's qconv needs uint8
    config = get_default_x86_inductor_quantization_config()
    import attrs

    int8_act = attrs.evolve(config.input_activation, dtype=torch.int8, quant_min=-128, quant_max=127)
    int8_config = attrs.evolve(config, input_activation=int8_act, output_activation=int8_act)
    converted = quantize(Conv(), (torch.randn(1, 3, 8, 8),), x86_quantizer(int8_config))
    lowered = lower(converted, (torch.randn(1, 3, 8, 8),))
    assert count(lowered, onednn.qconv2d_pointwise.default) == 0
    assert count(lowered, aten.conv2d.default) == 1


class Mlp(torch.nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32, bias=bias)
        self.fc2 = torch.nn.Linear(32, 8, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)])
def test_linear_relu_linear_lowers_to_two_qlinears(shape):
    example = (torch.randn(*shape),)
    converted = quantize(Mlp(), example)
    lowered = lower(converted, example)
    first, second = calls(lowered, onednn.qlinear_pointwise.default)
    assert first.args[9:11] == (torch.uint8, "relu")
    assert second.args[9:11] == (torch.float32, "none")
    assert qdq_count(lowered) == 1  # only the input quantize remains
    assert lowered(*example).shape == (*shape[:-1], 8)
    assert_close_to_reference(converted, lowered, example, atol=1e-5)


def test_linear_without_bias_gets_none():
    example = (torch.randn(4, 16),)
    lowered = lower(quantize(Mlp(bias=False), example), example)
    assert all(n.args[6] is None for n in calls(lowered, onednn.qlinear_pointwise.default))


def _cia_decomposed(converted, example):
    table = torch.export.default_decompositions()
    for op in list(table):
        if not torch._export.utils._is_cia_op(op):
            del table[op]
    return torch.export.export(converted, example).run_decompositions(table).module()


@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)])
def test_decomposed_linear_forms_view_t_addmm_are_lowered(shape):
    example = (torch.randn(*shape),)
    converted = quantize(Mlp(), example)
    decomposed = _cia_decomposed(converted, example)
    assert count(decomposed, aten.addmm.default) == 2
    lowered = lower(decomposed, example)
    assert count(lowered, onednn.qlinear_pointwise.default) == 2
    assert count(lowered, aten.addmm.default, aten.mm.default, aten.t.default) == 0
    assert count(lowered, aten.view.default) == 0
    assert_close_to_reference(converted, lowered, example, atol=1e-5)


def test_dynamic_activation_uses_the_tensor_overload():
    example = (torch.randn(4, 16),)
    config = get_default_x86_inductor_quantization_config(is_dynamic=True)
    converted = quantize(Mlp(), example, x86_quantizer(config))
    lowered = lower(converted, example)
    assert count(lowered, onednn.qlinear_pointwise.tensor) == 2
    assert count(lowered, qd.dequantize_per_tensor.tensor) == 0
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


# --------------------------------------------------------------------------- linear as matmul / bmm
class MatmulTransposedWeight(torch.nn.Module):
    """``x @ w.t() + b`` followed by relu: a linear written by hand."""

    def __init__(self, transpose_input=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(16) * 0.1)
        self.transpose_input = transpose_input

    def forward(self, x):
        if self.transpose_input:
            x = x.transpose(0, 1)
        return torch.relu(x @ self.w.t() + self.b)


class MatmulInOutWeight(torch.nn.Module):
    """``torch.matmul(x, w)`` with ``w`` stored [in, out] (weight quantized on axis 1)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 16) * 0.3)

    def forward(self, x):
        return torch.matmul(x, self.w)


class LinearOnTransposedInput(torch.nn.Module):
    """A linear on a non-contiguous N-D input: its CIA decomposition is ``expand + bmm``."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(x.transpose(0, 1))


LINEAR_AS_MATMUL_CASES = [  # (model factory, input shape, has a bias add and a relu)
    (MatmulTransposedWeight, (4, 8), True),
    (MatmulTransposedWeight, (2, 5, 8), True),
    (lambda: MatmulTransposedWeight(transpose_input=True), (5, 2, 8), True),
    (MatmulInOutWeight, (2, 5, 8), False),
    (MatmulInOutWeight, (3, 2, 5, 8), False),
    (LinearOnTransposedInput, (5, 2, 8), False),
    (LinearOnTransposedInput, (5, 2, 3, 8), False),
]
MATMUL_FORMS = (aten.matmul.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.expand.default,
                aten.t.default, aten.permute.default, aten.linear.default)


def _assert_one_qlinear(converted, lowered, example):
    (qlinear,) = calls(lowered, onednn.qlinear_pointwise.default)
    assert count(lowered, *MATMUL_FORMS) == 0
    assert qdq_count(lowered) == 1  # only the input quantize remains: no dq around the qlinear
    assert qlinear.args[0].target == qd.quantize_per_tensor.default
    assert counters(lowered)["qlinear_weight_prepack_matcher_count"] == 1
    reference, actual = converted(*example), lowered(*example)
    assert actual.shape == reference.shape
    assert_close_to_reference(converted, lowered, example)
    return qlinear


@pytest.mark.parametrize("factory, shape, bias_and_relu", LINEAR_AS_MATMUL_CASES)
def test_linear_written_as_matmul_lowers_to_one_qlinear(factory, shape, bias_and_relu):
    example = (torch.randn(*shape),)
    converted = quantize(factory(), example)
    assert count(converted, qd.dequantize_per_channel.default) == 1  # the weight was annotated
    qlinear = _assert_one_qlinear(converted, lower(converted, example), example)
    if bias_and_relu:
        assert qlinear.args[6] is not None and qlinear.args[10] == "relu"  # bias add absorbed, relu fused


@pytest.mark.parametrize("factory, shape, bias_and_relu", LINEAR_AS_MATMUL_CASES)
def test_decomposed_matmul_and_expand_bmm_forms_lower_to_one_qlinear(factory, shape, bias_and_relu):
    example = (torch.randn(*shape),)
    converted = quantize(factory(), example)
    decomposed = _cia_decomposed(converted, example)
    if factory is LinearOnTransposedInput:
        # the seed's bmm form: expand(dq(x)) -> bmm <- expand(t(dq_pc(w))), then the bias add
        assert count(decomposed, aten.bmm.default) == 1 and count(decomposed, aten.expand.default) == 2
    _assert_one_qlinear(converted, lower(decomposed, example), example)


def test_bmm_bias_and_weight_are_the_linears():
    example = (torch.randn(5, 2, 8),)
    model = LinearOnTransposedInput()
    converted = quantize(model, example)
    lowered = lower(_cia_decomposed(converted, example), example)
    (qlinear,) = calls(lowered, onednn.qlinear_pointwise.default)
    bias = functools.reduce(getattr, qlinear.args[6].target.split("."), lowered)
    assert torch.equal(bias, model.fc.bias.detach())
    assert qlinear.args[7:11] == (1.0, 0, torch.float32, "none")


def test_matmul_of_two_activations_and_a_batched_constant_are_left_alone():
    class TwoActivations(torch.nn.Module):
        def forward(self, x, y):
            return x @ y.transpose(-1, -2)

    class BatchedWeight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 8, 16))

        def forward(self, x):
            return x @ self.w

    for model, example in ((TwoActivations(), (torch.randn(2, 5, 8), torch.randn(2, 4, 8))),
                           (BatchedWeight(), (torch.randn(2, 5, 8),))):
        with pytest.warns(NothingAnnotatedWarning):
            converted = quantize(model, example)
        assert qdq_count(converted) == 0
        lowered = lower(converted, example)
        assert count(lowered, onednn.qlinear_pointwise.default) == 0
        assert count(lowered, aten.matmul.default) == 1
