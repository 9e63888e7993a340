"""conv1d and conv3d: annotated with the x86 recipe (``X86InductorQuantizer(conv1d_conv3d=True)``,
qcore's opt-in; by default only conv1d + relu, as torchao's recipe) and lowered to oneDNN's int8
conv (``qconv2d_pointwise``): a 1-D conv runs as a 2-D one with a height of 1 and fuses every conv
post-op; a 3-D conv fuses only its output quantize (oneDNN refuses its post-ops), also compiled."""

from __future__ import annotations

import pytest
import torch

import qcore
import qcore.coverage
import qcore.errors

from _onednn_helpers import (
    skip_range_clamp,
    aten, assert_close_to_reference, calls, count, counters, largest_activation_scale, lower, onednn, qd,
)
from _onednn_helpers import quantize as quantize_with
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config


def opted_in() -> X86InductorQuantizer:
    return X86InductorQuantizer(conv1d_conv3d=True).set_global(get_default_x86_inductor_quantization_config())


def quantize(model: torch.nn.Module, example: tuple) -> torch.fx.GraphModule:
    """The x86 recipe with conv1d/conv3d opted in."""
    return quantize_with(model, example, opted_in())

QCONV = onednn.qconv2d_pointwise.default


class Conv1dStack(torch.nn.Module):
    """conv1d -> relu -> conv1d (stride 2, dilation 2) -> relu6: what a 1-D signal model looks like."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.b = torch.nn.Conv1d(8, 6, 3, stride=2, padding=2, dilation=2)

    def forward(self, x):
        return torch.nn.functional.relu6(self.b(torch.relu(self.a(x))))


class Conv3dStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv3d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv3d(4, 5, (1, 3, 3), stride=(1, 2, 2))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - actual).pow(2).mean()))


def test_conv1d_runs_as_a_2d_onednn_conv_with_its_post_ops_and_output_quantize_fused():
    example = (torch.randn(2, 4, 32),)
    model = Conv1dStack().eval()
    converted = quantize(model, example)
    assert count(converted, aten.conv1d.default) == 2
    lowered = lower(converted, example)
    assert counters(lowered)["qconv1d_weight_prepack_matcher_count"] == 2
    assert counters(lowered)["qconv1d_unary_matcher_count"] == 2
    assert counters(lowered)["qconv1d_as_qconv2d_count"] == 2
    first, second = calls(lowered, QCONV)
    # x:u8 -> unsqueeze -> qconv(relu, u8 out) -> squeeze -> unsqueeze -> qconv(hardtanh [0, 6], f32) -> squeeze
    assert first.args[0].target == aten.unsqueeze.default
    assert first.args[11:16] == (second.args[1], second.args[2], torch.uint8, "relu", [])
    assert second.args[0].target == aten.unsqueeze.default and skip_range_clamp(second.args[0].args[0]).args[0] is first
    assert second.args[7:10] == ([1, 2], [0, 2], [1, 2])  # stride, padding, dilation with a height of 1
    assert second.args[13:16] == (torch.float32, "hardtanh", [0.0, 6.0])
    assert count(lowered, aten.conv1d.default, aten.relu6.default, aten.hardtanh.default) == 0
    assert count(lowered, qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default) == 0
    assert_close_to_reference(converted, lowered, example)
    with torch.no_grad():
        assert sqnr(model(*example), lowered(*example)) > 30


def test_conv3d_lowers_to_onednn_and_its_relu_stays_float():
    example = (torch.randn(1, 3, 4, 8, 8),)
    model = Conv3dStack().eval()
    converted = quantize(model, example)
    lowered = lower(converted, example)
    assert counters(lowered)["qconv3d_weight_prepack_matcher_count"] == 2
    assert "qconv3d_unary_matcher_count" not in counters(lowered)
    first, second = calls(lowered, QCONV)
    assert first.args[13:15] == (torch.float32, "none")  # oneDNN's 3-D conv takes no relu
    assert second.args[7] == [1, 2, 2]
    (relu,) = calls(lowered, aten.relu.default)
    assert relu.args[0] is first and second.args[0].target == qd.quantize_per_tensor.default
    assert count(lowered, aten.conv3d.default, qd.dequantize_per_tensor.default) == 0
    assert_close_to_reference(converted, lowered, example)
    with torch.no_grad():
        assert sqnr(model(*example), lowered(*example)) > 30


def test_conv1d_followed_by_a_quantized_consumer_writes_uint8():
    class Conv1dThenLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = torch.nn.Conv1d(4, 8, 3), torch.nn.Linear(8 * 14, 5)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    example = (torch.randn(2, 4, 16),)
    converted = quantize(Conv1dThenLinear(), example)
    lowered = lower(converted, example)
    (conv,) = calls(lowered, QCONV)
    assert conv.args[13:15] == (torch.uint8, "none") and conv.args[0].target == aten.unsqueeze.default
    assert counters(lowered)["qconv1d_unary_matcher_count"] == 1
    assert count(lowered, onednn.qlinear_pointwise.default) == 1
    assert_close_to_reference(converted, lowered, example)


class Conv1dResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y)


def test_conv1d_residual_add_stays_a_float_add_and_correct():
    example = (torch.randn(2, 4, 16),)
    converted = quantize(Conv1dResidual(), example)
    lowered = lower(converted, example)
    assert count(lowered, QCONV) == 2
    assert count(lowered, torch.ops.qcore_onednn.qconv2d_add.default, onednn.qconv2d_pointwise.binary) == 0
    assert count(lowered, aten.add.Tensor) == 1
    assert_close_to_reference(converted, lowered, example)


@pytest.mark.slow
@pytest.mark.parametrize("model, example", [(Conv1dStack, (2, 4, 32)), (Conv3dStack, (1, 3, 4, 8, 8))], ids=["1d", "3d"])
def test_conv1d_and_conv3d_compile_with_qcore_compile(model, example):
    """torch's own Inductor patterns match ``qconv_pointwise`` (not the ``qconv2d_pointwise`` name
    qcore calls) and would fuse a relu oneDNN's 3-D conv refuses; its shape function is right for
    a 1-D conv only in the 2-D form."""
    torch._dynamo.reset()
    example = (torch.randn(*example),)
    converted = quantize(model(), example)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=example)
    with torch.no_grad():
        expected = compiled.lowered(*example)
    assert (expected - compiled(*example)).abs().max() <= largest_activation_scale(converted) * 1.01 + 1e-5
    torch._dynamo.reset()


class Conv1dGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(4, 8, 3), torch.nn.Conv1d(8, 8, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(torch.relu(self.a(x))))


def test_by_default_only_conv1d_relu_is_quantized_as_in_torchaos_recipe():
    """torchao's x86 recipe: conv1d + relu (its unary patterns); a conv1d with another post-op or
    none, and conv3d, stay float."""
    example = (torch.randn(2, 4, 16),)
    default = quantize_with(Conv1dGelu(), example)
    (first, second) = calls(default, aten.conv1d.default)
    assert first.args[0].target is qd.dequantize_per_tensor.default  # conv1d -> relu: quantized
    assert second.args[0].op != "call_function" or "dequantize" not in str(second.args[0].target)  # lone: float
    with pytest.warns(qcore.coverage.NothingAnnotatedWarning, match=r"conv 0/2"):
        conv3d = quantize_with(Conv3dStack(), (torch.randn(1, 3, 4, 8, 8),))
    assert count(conv3d, qd.quantize_per_tensor.default) == 0
    opted = quantize(Conv1dGelu(), example)
    assert all(c.args[0].target is qd.dequantize_per_tensor.default for c in calls(opted, aten.conv1d.default))


def test_quantize_takes_the_opt_in_as_quantizer_options():
    example = (torch.randn(2, 4, 16),)
    model = Conv1dGelu().eval()
    plain = qcore.quantize(model, example, backend="onednn", measure_latency=False, lower=False)
    opted = qcore.quantize(model, example, backend="onednn", measure_latency=False, lower=False,
                           quantizer_options={"conv1d_conv3d": True})
    assert count(plain.converted, qd.quantize_per_tensor.default) == 1
    assert count(opted.converted, qd.quantize_per_tensor.default) == 2
    with pytest.raises(qcore.errors.QuantizeError, match=r"X86InductorQuantizer takes no conv1d; allowed: sharing_recipe, conv1d_conv3d"):
        qcore.quantize(model, example, backend="onednn", measure_latency=False, quantizer_options={"conv1d": True})
    with pytest.raises(qcore.errors.QuantizeError, match=r"conv1d_conv3d must be True or False"):
        qcore.quantize(model, example, backend="onednn", measure_latency=False, quantizer_options={"conv1d_conv3d": 1})
