"""The eager oneDNN lowering gives the q/dq program's result whatever the layout of the tensors
it hands to a oneDNN kernel: transposed, permuted, sliced, expanded, channels-last, 3-D and 4-D.

oneDNN's kernels read some operands as plain row-major buffers whatever their strides (a linear's
binary ``other``, biases, weight scales, the int8 weight at prepack time, the operands of
``_weight_int8pack_mm``); the lowering makes those contiguous. Each model is quantized with
``qcore.quantize(..., backend="onednn")``; the lowered model must match the q/dq program within
one quantization step, and the fused kernel must have been used."""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F

import qcore
import qcore_onednn_x86.lowering.custom_ops  # noqa: F401  (registers qcore_onednn ops)

from _onednn_helpers import aten, calls, counters, onednn, qd

nn = torch.nn
QCONV_ADD = torch.ops.qcore_onednn.qconv2d_add.default
QLINEAR_BINARY = (onednn.qlinear_pointwise.binary, onednn.qlinear_pointwise.binary_tensor)


def quantized(model: nn.Module, shape: tuple, batches: int = 4) -> Any:
    """``qcore.quantize`` on random batches of ``shape``; returns the QuantizeResult. conv1d and
    conv3d are opted in (``conv1d_conv3d``): their lowerings' layouts are under test here."""
    torch.manual_seed(0)
    data = [(torch.randn(*shape),) for _ in range(batches)]
    return qcore.quantize(model.eval(), data[0], backend="onednn", calibration=data, measure_latency=False,
                          quantizer_options={"conv1d_conv3d": True})


def output_step(converted: torch.fx.GraphModule) -> float:
    """One quantization step of the output: the scale of the dequantize that makes the output,
    else the largest activation scale of the program (the step a rounding flip of any quantized
    input moves the float output by, about)."""
    (output,) = [n for n in converted.graph.nodes if n.op == "output"]
    last = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    if last.op == "call_function" and last.target is qd.dequantize_per_tensor.default:
        return float(last.args[1])
    return max(float(n.args[1]) for n in calls(converted, qd.quantize_per_tensor.default))


def assert_matches_program(result: Any, x: Optional[torch.Tensor] = None, lowered: Optional[torch.fx.GraphModule] = None) -> None:
    """The eager-lowered model's output is the q/dq program's within one output step (plus a
    float epsilon of the output's magnitude), on ``x`` (by default the calibration example)."""
    x = result.example_inputs[0] if x is None else x
    lowered = result.lowered if lowered is None else lowered
    with torch.no_grad():
        expected, actual = result.converted(x), lowered(x)
    tolerance = 1.01 * output_step(result.converted) + 1e-5 * expected.abs().max().item()
    diff = (expected - actual).abs().max().item()
    assert diff <= tolerance, f"lowered differs from the q/dq program by {diff} > {tolerance}"


def only_binary_linear(lowered: torch.fx.GraphModule) -> torch.fx.Node:
    (binary,) = calls(lowered, *QLINEAR_BINARY)
    assert counters(lowered)["qlinear_binary_matcher_count"] == 1
    assert calls(lowered, aten.add.Tensor) == []
    return binary


# ----------------------------------------------------------------- linear + add, layouts of other


class PatchEmbedResidual(nn.Module):
    """The report: conv patches flattened and transposed to [B, L, C] (a view), then x + fc(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        x = self.conv(x).flatten(2).transpose(1, 2)
        return x + self.fc(x)


class Residual(nn.Module):
    """``fc(v) + v`` (or ``v + fc(v)``) for the view ``v = view(x)``."""

    def __init__(self, view: Callable, width: int = 16, swap: bool = False) -> None:
        super().__init__()
        self.view, self.swap = view, swap
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        v = self.view(x)
        return v + self.fc(v) if self.swap else self.fc(v) + v


RESIDUAL_LAYOUTS = {
    # name: (view, input shape, linear width)
    "transposed_sequence": (lambda x: x.transpose(1, 2), (2, 16, 12), 16),
    "permuted_4d": (lambda x: x.permute(0, 2, 3, 1), (2, 8, 3, 5), 8),
    "sliced_last_dim": (lambda x: x[..., ::2], (2, 6, 32), 16),
    "expanded_rows": (lambda x: x[:, :1].expand(-1, 6, -1), (2, 6, 16), 16),
    "transposed_2d": (lambda x: x.t(), (16, 6), 16),
    "contiguous_mul_output": (lambda x: x * 2.0, (2, 6, 16), 16),  # contiguous: a no-op contiguous
}


def test_linear_add_on_transposed_conv_patches_matches_the_program():
    result = quantized(PatchEmbedResidual(), (2, 3, 16, 16))
    binary = only_binary_linear(result.lowered)
    assert binary.args[6].target is aten.contiguous.default  # the transposed view, made row-major
    assert_matches_program(result)
    assert_matches_program(result, torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))


@pytest.mark.parametrize("swap", [False, True], ids=["fc_first", "other_first"])
@pytest.mark.parametrize("layout", list(RESIDUAL_LAYOUTS))
def test_linear_add_with_an_other_of_any_layout_matches_the_program(layout, swap):
    view, shape, width = RESIDUAL_LAYOUTS[layout]
    result = quantized(Residual(view, width, swap), shape)
    binary = only_binary_linear(result.lowered)
    assert binary.args[6].target is aten.contiguous.default
    assert counters(result.lowered)["qlinear_binary_contiguous_other_count"] == 1
    assert_matches_program(result)


def test_linear_add_on_a_graph_input_passed_in_another_layout_matches_the_program():
    result = quantized(Residual(lambda x: x), (2, 6, 16))
    only_binary_linear(result.lowered)
    for x in (torch.randn(2, 16, 6).transpose(1, 2), torch.randn(6, 2, 16).transpose(0, 1), torch.randn(2, 6, 32)[..., 1::2]):
        assert not x.is_contiguous()
        assert_matches_program(result, x)


class ExpandedOther(nn.Module):
    """fc(x) + p.expand(...): ``other`` has zero strides."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.p = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x):
        return self.fc(x) + self.p.expand(x.shape[0], x.shape[1], 16)


def test_linear_add_with_an_expanded_other_matches_the_program():
    result = quantized(ExpandedOther(), (2, 6, 16))
    only_binary_linear(result.lowered)
    assert_matches_program(result)


class NormResidual(nn.Module):
    """A transformer FFN residual on a 3-D layer-norm output (always contiguous)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h


def test_linear_add_on_a_3d_layer_norm_output_needs_no_copy():
    result = quantized(NormResidual(), (2, 6, 16))
    binary = only_binary_linear(result.lowered)
    assert binary.args[6].target is not aten.contiguous.default
    assert "qlinear_binary_contiguous_other_count" not in counters(result.lowered)
    assert_matches_program(result)


class ConvThenLinearOverWidth(nn.Module):
    """A 4-D linear over the width of a conv output (channels-last once lowered)."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        y = torch.relu(y) if self.relu else y
        return self.fc(y) + y


@pytest.mark.parametrize("relu", [False, True], ids=["conv", "conv_relu"])
def test_4d_linear_add_on_a_channels_last_conv_output_matches_the_program(relu):
    result = quantized(ConvThenLinearOverWidth(relu), (2, 3, 8, 8))
    only_binary_linear(result.lowered)
    assert counters(result.lowered)["qconv2d_weight_prepack_matcher_count"] == 1
    assert_matches_program(result)


class GeluTransposedResidual(nn.Module):
    """gelu of a transposed tensor is fresh (so the add sums in place) but not contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = F.gelu(x.transpose(1, 2))
        return self.fc(h) + h


def test_linear_sum_in_place_into_a_non_contiguous_fresh_tensor_matches_the_program():
    result = quantized(GeluTransposedResidual(), (2, 16, 6))
    binary = only_binary_linear(result.lowered)
    assert binary.args[13] == "sum"
    assert binary.args[6].target is aten.contiguous.default  # sums into a row-major copy
    assert_matches_program(result)


class TransposedResidualQuantized(nn.Module):
    """linear + transposed other + relu, then a quantize (uint8 output "add"), then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = x.transpose(1, 2)
        return self.head(torch.relu(self.fc(x) + x))


def test_linear_add_relu_quantize_with_a_transposed_other_matches_the_program():
    result = quantized(TransposedResidualQuantized(), (2, 16, 6))
    binary = only_binary_linear(result.lowered)
    assert binary.args[10] == torch.uint8 and binary.args[13] == "add" and binary.args[15] == "relu"
    assert binary.args[6].target is aten.contiguous.default
    assert_matches_program(result)


# ----------------------------------------------------------------- conv inputs and accumulators


class ConvAdd(nn.Module):
    """conv(y) + a transposed or channel-sliced view of y; ``tail`` quantizes the sum (uint8
    output) or not (float output)."""

    def __init__(self, tail: bool, accumulator: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 4, 1) if tail else None
        self.accumulator = accumulator

    def forward(self, x):
        y = torch.relu(self.stem(x))
        other = y[:, :8].transpose(2, 3) if self.accumulator == "transposed" else y[:, ::2]
        z = torch.relu(self.conv(y) + other)
        return self.tail(z) if self.tail is not None else z


@pytest.mark.parametrize("accumulator", ["transposed", "channel_sliced"])
@pytest.mark.parametrize("tail", [True, False], ids=["uint8_out", "float_out"])
def test_conv_add_with_a_non_contiguous_accumulator_matches_the_program(tail, accumulator):
    result = quantized(ConvAdd(tail, accumulator), (2, 3, 8, 8))
    (binary,) = calls(result.lowered, QCONV_ADD)
    assert binary.args[14] == (torch.uint8 if tail else torch.float32)
    assert counters(result.lowered)["qconv2d_binary_matcher_count"] == 1
    assert_matches_program(result)


class ConvOnView(nn.Module):
    def __init__(self, view: Callable, channels: int, conv: Callable = nn.Conv2d) -> None:
        super().__init__()
        self.view = view
        self.conv = conv(channels, 8, 3, padding=1)
        self.conv2 = conv(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv(self.view(x))))


CONV_LAYOUTS = {
    # name: (view, input shape, in channels, conv class)
    "nhwc_permuted": (lambda x: x.permute(0, 3, 1, 2), (2, 6, 6, 8), 8, nn.Conv2d),
    "channel_sliced": (lambda x: x[:, ::2], (2, 8, 6, 6), 4, nn.Conv2d),
    "transposed_hw": (lambda x: x.transpose(2, 3), (2, 8, 6, 5), 8, nn.Conv2d),
    "conv1d_transposed": (lambda x: x.transpose(1, 2), (2, 10, 8), 8, nn.Conv1d),
    "conv3d_permuted": (lambda x: x.permute(0, 4, 1, 2, 3), (2, 4, 4, 4, 8), 8, nn.Conv3d),
}


@pytest.mark.parametrize("layout", list(CONV_LAYOUTS))
def test_conv_on_a_non_contiguous_input_matches_the_program(layout):
    view, shape, channels, conv = CONV_LAYOUTS[layout]
    result = quantized(ConvOnView(view, channels, conv), shape)
    rank = len(shape) - 2
    assert counters(result.lowered)[f"qconv{rank}d_weight_prepack_matcher_count"] == 2
    assert_matches_program(result)


def test_conv_add_on_a_channels_last_graph_input_matches_the_program():
    class InputResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.tail = nn.Conv2d(8, 4, 1)

        def forward(self, x):  # (the conv's own input is never its accumulator: a transpose of it)
            return self.tail(torch.relu(self.conv(x) + x.transpose(2, 3)))

    result = quantized(InputResidual(), (2, 8, 6, 6))
    assert counters(result.lowered)["qconv2d_binary_matcher_count"] == 1
    assert counters(result.lowered)["qconv2d_channels_last_input_matcher_count"] >= 1
    for x in (torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last), torch.randn(2, 8, 6, 6).transpose(2, 3)):
        assert_matches_program(result, x)


# ----------------------------------------------------------------- uint8 pool / cat / reshape


class PoolThenTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(F.max_pool2d(torch.relu(self.conv(x)), 2).transpose(2, 3))


class CatThenTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.tail = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.tail(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1).transpose(2, 3))


@pytest.mark.parametrize("model,counter", [(PoolThenTranspose, "qmaxpool2d_matcher_count"), (CatThenTranspose, "qcat_matcher_count")],
                         ids=["max_pool2d", "cat"])
def test_uint8_pool_and_cat_of_channels_last_tensors_match_the_program(model, counter):
    result = quantized(model(), (2, 8, 6, 6))
    assert counters(result.lowered)[counter] == 1
    assert_matches_program(result)


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "channels_last", "transposed", "channel_sliced", "expanded"],
)
def test_uint8_max_pool2d_kernel_reads_any_layout(layout):
    torch.manual_seed(0)
    base = torch.randint(0, 181, (2, 8, 6, 7), dtype=torch.uint8)
    x = {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed": base.transpose(2, 3),
        "channel_sliced": torch.randint(0, 181, (2, 16, 6, 7), dtype=torch.uint8)[:, ::2],
        "expanded": base[:, :, :1].expand(2, 8, 6, 7),
    }[layout]
    pooled = torch.ops.quantized.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert torch.equal(pooled, F.max_pool2d(x.float(), 2).to(torch.uint8))


class ConcatenatedProjectionsFlattened(nn.Module):
    """Two linears on one input (concatenated into one GEMM: their outputs become column views),
    each flattened with ``view(n, -1)``, valid on a contiguous output only."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x).view(x.shape[0], -1) + self.k(x).view(x.shape[0], -1) * 0.5


def test_views_of_concatenated_linear_outputs_become_reshapes():
    result = quantized(ConcatenatedProjectionsFlattened(), (2, 6, 16))
    assert counters(result.lowered)["qlinear_concat_matcher_count"] == 1
    assert counters(result.lowered)["qlinear_concat_view_to_reshape_count"] == 2
    assert calls(result.lowered, aten.view.default) == []
    assert_matches_program(result)


# ----------------------------------------------------------------- biases, scales, weights


class StridedBias(nn.Module):
    def __init__(self, kind: str, strided: str) -> None:
        super().__init__()
        self.kind, self.strided = kind, strided
        self.layer = nn.Linear(16, 16) if kind == "linear" else nn.Conv2d(3, 8, 3)
        out = self.layer.weight.shape[0]
        self.b = nn.Parameter(torch.randn(2 * out))

    def forward(self, x):
        out = self.layer.weight.shape[0]
        b = self.b[::2] if self.strided == "sliced" else self.b[:1].expand(out)
        if self.kind == "linear":
            return F.linear(x, self.layer.weight, b)
        return F.conv2d(x, self.layer.weight, b)


@pytest.mark.parametrize("strided", ["sliced", "expanded"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_strided_bias_matches_the_program(kind, strided):
    shape = (4, 16) if kind == "linear" else (2, 3, 8, 8)
    result = quantized(StridedBias(kind, strided), shape)
    prefix = "qlinear" if kind == "linear" else "qconv"
    assert counters(result.lowered)[f"{prefix}_contiguous_operand_count"] == 1
    assert counters(result.lowered)[f"{prefix}{'' if kind == 'linear' else '2d'}_weight_prepack_matcher_count"] == 1
    assert_matches_program(result)


def test_a_transposed_linear_weight_parameter_matches_the_program():
    model = Residual(lambda x: x * 2.0)
    model.fc.weight = nn.Parameter(torch.randn(16, 16).t() * 0.25)
    assert not model.fc.weight.is_contiguous()
    result = quantized(model, (2, 6, 16))
    only_binary_linear(result.lowered)
    assert_matches_program(result)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_non_contiguous_weight_scales_are_copied_contiguous(kind):
    model = Residual(lambda x: x * 2.0) if kind == "linear" else ConvOnView(lambda x: x, 3)
    result = quantized(model, (2, 6, 16) if kind == "linear" else (2, 3, 6, 6))
    converted = result.converted
    for dq in calls(converted, qd.dequantize_per_channel.default):
        scale_node = dq.args[1]
        scale = getattr(converted, scale_node.target)
        strided = torch.empty(2 * scale.numel(), dtype=scale.dtype)[::2]
        strided.copy_(scale)
        setattr(converted, scale_node.target, strided)
    lowered = qcore.lower(converted, backend="onednn", example_inputs=result.example_inputs)
    prefix = "qlinear" if kind == "linear" else "qconv"
    assert counters(lowered)[f"{prefix}_contiguous_operand_count"] >= 1
    assert_matches_program(result, lowered=lowered)


# ----------------------------------------------------------------- weight-only int8 (bf16)


class WeightOnlyInt8(nn.Module):
    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layout = layout
        self.register_buffer("weight", torch.randint(-128, 128, (8, 16), dtype=torch.int8))
        self.register_buffer("weight_in_out", torch.randint(-128, 128, (16, 8), dtype=torch.int8))
        self.register_buffer("scales", (torch.rand(8) * 0.01 + 0.001).bfloat16())
        self.register_buffer("wide_scales", (torch.rand(16) * 0.01 + 0.001).bfloat16())

    def forward(self, x):
        w, scales = self.weight, self.scales
        if self.layout == "transposed_x":
            x = x.t()
        elif self.layout == "sliced_x":
            x = x[..., ::2]
        elif self.layout == "transposed_weight":
            w = self.weight_in_out.t()
        elif self.layout == "sliced_scales":
            scales = self.wide_scales[::2]
        elif self.layout == "expanded_scales":
            scales = self.scales[:1].expand(8)
        return F.linear(x, w.to(x.dtype)) * scales


WOQ_LAYOUTS = {
    "transposed_x": (16, 4),
    "sliced_x": (2, 3, 32),
    "transposed_weight": (4, 16),
    "sliced_scales": (4, 16),
    "expanded_scales": (4, 16),
}


@pytest.mark.parametrize("layout", list(WOQ_LAYOUTS))
def test_weight_only_int8_matmul_on_non_contiguous_operands_matches_the_graph(layout):
    example = (torch.randn(*WOQ_LAYOUTS[layout], dtype=torch.bfloat16),)
    graph = torch.export.export(WeightOnlyInt8(layout), example).module()
    lowered = qcore.lower(graph, backend="onednn", example_inputs=example)
    assert counters(lowered)["woq_matcher_count"] == 1
    assert len(calls(lowered, aten._weight_int8pack_mm.default)) == 1
    with torch.no_grad():
        expected, actual = graph(*example), lowered(*example)
    # both round to bf16: a few bf16 steps of the output's magnitude
    assert (expected.float() - actual.float()).abs().max() <= 0.02 * expected.float().abs().max()


# ----------------------------------------------------------------- torch.compile agrees


@pytest.mark.slow
def test_compiled_layouts_agree_with_the_program():
    torch._dynamo.reset()
    for model, shape in ((PatchEmbedResidual(), (2, 3, 16, 16)), (GeluTransposedResidual(), (2, 16, 6)),
                         (Residual(lambda x: x.transpose(1, 2)), (2, 16, 12))):
        result = quantized(model, shape)
        x = result.example_inputs[0]
        compiled = qcore.compile(result.converted, backend="onednn", example_inputs=(x,))
        with torch.no_grad():
            expected = result.converted(x)
        tolerance = 1.01 * output_step(result.converted) + 1e-5 * expected.abs().max().item()
        for _ in range(2):
            assert (compiled(x.clone()) - expected).abs().max().item() <= tolerance
    torch._dynamo.reset()
