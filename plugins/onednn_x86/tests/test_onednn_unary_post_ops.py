"""Unary post-op and output-quantize fusion into oneDNN conv / linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _onednn_helpers import assert_close_to_reference, calls, count, counters, lower, onednn, qd, quantize


class ConvAct(torch.nn.Module):
    def __init__(self, act, then_conv=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 1)
        self.act, self.then_conv = act, then_conv

    def forward(self, x):
        y = self.act(self.conv(x))
        return self.conv2(y) if self.then_conv else y


CONV_ACTS = [
    (torch.relu, "relu", []),
    (F.relu6, "hardtanh", [0.0, 6.0]),
    (lambda x: F.hardtanh(x, -0.5, 0.5), "hardtanh", [-0.5, 0.5]),
    (F.hardswish, "hardswish", []),
    (F.silu, "swish", []),
]


@pytest.mark.parametrize("act,attr,scalars", CONV_ACTS)
def test_conv_unary_quantize_fuses_into_one_uint8_conv(act, attr, scalars):
    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ConvAct(act), example)
    quant = calls(converted, qd.quantize_per_tensor.default)[1]
    lowered = lower(converted, example)
    first, second = calls(lowered, onednn.qconv2d_pointwise.default)
    assert first.args[11:16] == (quant.args[1], quant.args[2], torch.uint8, attr, scalars)
    assert second.args[13:15] == (torch.float32, "none")
    assert count(lowered, qd.quantize_per_tensor.default) == 1  # the model input only
    assert counters(lowered)["qconv2d_unary_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example)


def test_conv_relu_quantize_matches_the_reference_in_integers():
    example = (torch.randn(2, 3, 10, 10),)
    model = ConvAct(torch.relu, then_conv=True)
    converted = quantize(model, example)
    lowered = lower(converted, example)
    fused = calls(lowered, onednn.qconv2d_pointwise.default)[0]
    quant = calls(converted, qd.quantize_per_tensor.default)[1]
    # run both up to the uint8 tensor
    captured = {}


    from torch.fx.interpreter import Interpreter

    class Capture(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is fused or n is quant:
                captured[n.name] = out
            return out

    with torch.no_grad():
        Capture(converted).run(*example)
        Capture(lowered).run(*example)
    reference, actual = captured[quant.name], captured[fused.name]
    assert actual.dtype == torch.uint8
    assert (reference.int() - actual.int()).abs().max() <= 1


@pytest.mark.parametrize("act,attr,scalars", CONV_ACTS)
def test_conv_unary_without_quantize_fuses_with_float_output(act, attr, scalars):
    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ConvAct(act, then_conv=False), example)
    lowered = lower(converted, example)
    (qconv,) = calls(lowered, onednn.qconv2d_pointwise.default)
    assert qconv.args[11:16] == (1.0, 0, torch.float32, attr, scalars)
    assert_close_to_reference(converted, lowered, example, atol=1e-5)


class LinearAct(torch.nn.Module):
    def __init__(self, act, then_linear=True):
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)
        self.act, self.then_linear = act, then_linear

    def forward(self, x):
        y = self.act(self.fc(x))
        return self.fc2(y) if self.then_linear else y


LINEAR_ACTS = [
    (torch.relu, "relu", ""),
    (F.gelu, "gelu", "none"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu", "tanh"),
    (F.hardswish, "hardswish", ""),
    (F.silu, "swish", ""),
]


@pytest.mark.parametrize("then_linear", [True, False])
@pytest.mark.parametrize("act,name,algorithm", LINEAR_ACTS)
def test_linear_unary_fuses(act, name, algorithm, then_linear):
    example = (torch.randn(4, 16),)
    converted = quantize(LinearAct(act, then_linear), example)
    lowered = lower(converted, example)
    fused = calls(lowered, onednn.qlinear_pointwise.default)[0]
    assert fused.args[10] == name and fused.args[12] == algorithm
    assert fused.args[9] == (torch.uint8 if then_linear else torch.float32)
    assert counters(lowered)["qlinear_unary_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example, atol=None if then_linear else 1e-5)


def test_post_op_with_a_second_user_keeps_float_output():
    class Branch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.fc2 = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = torch.relu(self.fc(x))
            return self.fc2(y), y * 2

    example = (torch.randn(4, 8),)
    converted = quantize(Branch(), example)
    lowered = lower(converted, example)
    first = calls(lowered, onednn.qlinear_pointwise.default)[0]
    assert first.args[9:11] == (torch.float32, "relu")
    reference, actual = converted(*example), lowered(*example)
    for r, a in zip(reference, actual):
        assert (r - a).abs().max() < 1e-5
