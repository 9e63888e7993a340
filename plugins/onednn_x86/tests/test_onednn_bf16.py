"""int8-mixed-bf16: a converted model traced under CPU bf16 autocast lowers to oneDNN ops that
produce bf16 (or uint8 when a quantize follows), matching the unlowered bf16 graph."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from qcore_onednn_x86 import cpu_features
from qcore_onednn_x86.lowering.unwrap_bf16_autocast_inputs import NoNativeBf16Warning

from _onednn_helpers import counters, count, largest_activation_scale, lower, onednn, qdq_count, quantize

_CPU = cpu_features.detect_cpu()
needs_native_bf16 = pytest.mark.skipif(
    not _CPU.native_bf16,
    reason=f"this CPU has no native bf16 ({_CPU.name}, torch capability {_CPU.capability}): "
    f"int8-mixed-bf16 lowering declines here (test_bf16_lowering_declines_without_native_bf16)",
)

QOPS = (onednn.qconv2d_pointwise.default, onednn.qlinear_pointwise.default)


def autocast_bf16(converted: torch.fx.GraphModule, example: tuple) -> torch.fx.GraphModule:
    """The converted q/dq model retraced under bf16 autocast (casts after each dequantize)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        traced = make_fx(converted)(*example)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


class ConvReluConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def linear_relu_linear() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def qop_output_dtypes(lowered: torch.fx.GraphModule) -> list:
    found = []
    for node in lowered.graph.nodes:
        if node.op == "call_function" and node.target in QOPS:
            index = 13 if node.target is onednn.qconv2d_pointwise.default else 9
            found.append((node.args[index], node.args[index + 1]))
    return found


def lower_and_check(model: torch.nn.Module, example: tuple, qop_count: int) -> torch.fx.GraphModule:
    converted = quantize(model, example)
    graph = autocast_bf16(converted, example)
    lowered = lower(graph, example)
    assert counters(lowered)["bf16_autocast_input_unwrap_count"] == qop_count
    assert counters(lowered)["bf16_output_cast_fold_count"] == qop_count
    assert count(lowered, *QOPS) == qop_count
    assert qdq_count(lowered) == 1  # only the model input's quantize is left
    with torch.no_grad():
        expected, actual = graph(*example), lowered(*example)
    assert actual.dtype == torch.bfloat16 == expected.dtype
    step = largest_activation_scale(converted)
    tolerance = 2 * step + 0.02 * expected.float().abs().max().item()
    assert (expected.float() - actual.float()).abs().max().item() <= tolerance
    return lowered


@needs_native_bf16
def test_bf16_conv_relu_conv_lowers_to_uint8_then_bf16_output_convs():
    lowered = lower_and_check(ConvReluConv(), (torch.randn(2, 3, 8, 8),), 2)
    # conv1 + relu writes uint8 for conv2 (relu fused); conv2 writes bf16
    assert [(attr, dtype) for attr, dtype in zip(
        [n.args[14] for n in lowered.graph.nodes if n.target is onednn.qconv2d_pointwise.default],
        [d for d, _ in qop_output_dtypes(lowered)],
    )] == [("relu", torch.uint8), ("none", torch.bfloat16)]
    assert counters(lowered)["qconv2d_unary_matcher_count"] == 1


@needs_native_bf16
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16)], ids=["2d", "3d"])
def test_bf16_linear_relu_linear_lowers_to_qlinear_with_bf16_output(shape):
    lowered = lower_and_check(linear_relu_linear(), (torch.randn(*shape),), 2)
    assert [d for d, _ in qop_output_dtypes(lowered)] == [torch.uint8, torch.bfloat16]
    assert counters(lowered)["qlinear_unary_matcher_count"] == 1


def test_fp32_graph_keeps_fp32_outputs_and_no_bf16_counters():
    example = (torch.randn(4, 16),)
    lowered = lower(quantize(linear_relu_linear(), example), example)
    assert "bf16_autocast_input_unwrap_count" not in counters(lowered)
    assert [d for d, _ in qop_output_dtypes(lowered)] == [torch.uint8, torch.float32]


@needs_native_bf16
@pytest.mark.parametrize("tail", [True, False], ids=["uint8-out", "float-out"])
def test_bf16_conv_add_relu_becomes_one_binary_conv(tail):
    from test_onednn_binary_post_ops import QCONV_ADD, ResidualBlock

    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ResidualBlock(relu=True, tail=tail), example)
    graph = autocast_bf16(converted, example)
    lowered = lower(graph, example)
    assert counters(lowered)["qconv2d_binary_matcher_count"] == 1
    assert count(lowered, QCONV_ADD) == 1
    (binary,) = [n for n in lowered.graph.nodes if n.target is QCONV_ADD]
    assert binary.args[17] == "relu"
    if tail:
        assert binary.args[14] == torch.uint8
    with torch.no_grad():
        expected, actual = graph(*example), lowered(*example)
    tolerance = 2 * largest_activation_scale(converted) + 0.02 * expected.float().abs().max().item()
    assert (expected.float() - actual.float()).abs().max().item() <= tolerance


class LinearAddRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 16)
        self.second = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        y = self.first(x)
        return self.head(torch.relu(self.second(y) + y))


@needs_native_bf16
def test_bf16_linear_add_relu_becomes_one_binary_linear_with_uint8_output():
    example = (torch.randn(4, 16),)
    converted = quantize(LinearAddRelu(), example)
    graph = autocast_bf16(converted, example)
    lowered = lower(graph, example)
    assert counters(lowered)["qlinear_binary_matcher_count"] == 1
    (binary,) = [n for n in lowered.graph.nodes if n.target is onednn.qlinear_pointwise.binary]
    assert binary.args[10] == torch.uint8 and binary.args[13] == "add" and binary.args[15] == "relu"
    with torch.no_grad():
        expected, actual = graph(*example), lowered(*example)
    tolerance = 2 * largest_activation_scale(converted) + 0.02 * expected.float().abs().max().item()
    assert (expected.float() - actual.float()).abs().max().item() <= tolerance


@needs_native_bf16
@pytest.mark.slow
def test_bf16_graph_compiles_with_qcore_compile():
    import qcore

    torch._dynamo.reset()
    example = (torch.randn(4, 16),)
    graph = autocast_bf16(quantize(LinearAddRelu(), example), example)
    compiled = qcore.compile(graph, backend="onednn", example_inputs=example)
    with torch.no_grad():
        expected = compiled.lowered(*example)
    actual = compiled(*example)
    assert actual.dtype == torch.bfloat16
    assert (expected.float() - actual.float()).abs().max().item() <= 0.02 * expected.float().abs().max().item()
    torch._dynamo.reset()


def test_bf16_lowering_declines_without_native_bf16(monkeypatch):
    """On a CPU without native bf16 (forced here, so it runs on every CPU) the int8-mixed-bf16
    ops are left as they are, with one warning line, and the program runs as before."""
    without_bf16 = cpu_features.cpu_for_target("avx2")
    assert not without_bf16.native_bf16
    monkeypatch.setattr(cpu_features, "detect_cpu", lambda: without_bf16)
    example = (torch.randn(4, 16),)
    converted = quantize(LinearAddRelu(), example)
    graph = autocast_bf16(converted, example)
    with pytest.warns(NoNativeBf16Warning, match=r"int8-mixed-bf16 lowering declined for 3 conv/linear op\(s\): .*no native bf16") as caught:
        lowered = lower(graph, example)
    assert len([w for w in caught if issubclass(w.category, NoNativeBf16Warning)]) == 1
    assert "\n" not in str(caught[0].message)
    assert counters(lowered)["bf16_declined_no_native_bf16"] == 3
    assert "bf16_autocast_input_unwrap_count" not in counters(lowered)
    assert count(lowered, *QOPS, onednn.qlinear_pointwise.binary) == 0
    with torch.no_grad():
        expected, actual = graph(*example), lowered(*example)
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(expected, actual)
