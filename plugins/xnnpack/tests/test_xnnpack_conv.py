"""conv, conv -> relu and the transposed forms: annotations and q/dq counts after convert."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.spec import SharedQuantizationSpec
from _xnnpack_helpers import annotate, annotation, config, input_map, observer_nodes, qdq_counts, quantize, quantizer

X2D = (torch.randn(1, 3, 8, 8),)


class ConvRelu(torch.nn.Module):
    def __init__(self, relu: bool = True, transposed: bool = False, bias: bool = True) -> None:
        super().__init__()
        conv_cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
        self.conv = conv_cls(3, 4, 3, bias=bias)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) if self.relu else y


def test_conv_gets_input_weight_bias_and_output_specs():
    cfg = config()
    gm = annotate(ConvRelu(relu=False), X2D, quantizer())
    assert input_map(gm, "conv2d") == {"x": cfg.input_activation, "conv_weight": cfg.weight, "conv_bias": None}
    assert annotation(gm, "conv2d").output_qspec is cfg.output_activation


def test_conv_relu_has_no_observer_between_conv_and_relu():
    cfg = config()
    gm = annotate(ConvRelu(), X2D, quantizer())
    assert annotation(gm, "conv2d").output_qspec is None
    assert annotation(gm, "relu").output_qspec is cfg.output_activation
    prepared = qcore.prepare_pt2e(torch.export.export(ConvRelu().eval(), X2D).module(), quantizer())
    assert len(observer_nodes(prepared)) == 3  # conv input, conv weight, relu output; none on the bias


def test_conv1d_and_conv3d_are_annotated():
    # conv3d as ExecuTorch 1.5.1's quantizer (test_xnnpack_executorch_parity.py)
    class Convs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv1d(2, 2, 1)
            self.c3 = torch.nn.Conv3d(2, 2, 1)

        def forward(self, x, v):
            return self.c1(x), self.c3(v)

    gm = annotate(Convs(), (torch.randn(1, 2, 5), torch.randn(1, 2, 3, 3, 3)), quantizer())
    cfg = config()
    assert annotation(gm, "conv1d")._annotated
    assert input_map(gm, "conv3d") == {"v": cfg.input_activation, "c3_weight": cfg.weight, "c3_bias": None}
    assert annotation(gm, "conv3d").output_qspec is cfg.output_activation


def test_conv_transpose_relu_is_annotated_like_conv_relu():
    cfg = config()
    gm = annotate(ConvRelu(transposed=True), X2D, quantizer())
    assert input_map(gm, "conv_transpose2d") == {"x": cfg.input_activation, "conv_weight": cfg.weight, "conv_bias": None}
    assert annotation(gm, "relu").output_qspec is cfg.output_activation


def test_plain_conv_transpose_is_annotated_extension():
    cfg = config()
    gm = annotate(ConvRelu(relu=False, transposed=True), X2D, quantizer())
    assert annotation(gm, "conv_transpose2d").output_qspec is cfg.output_activation


def test_per_channel_conv_transpose_weight_is_quantized_along_axis_1():
    gm = annotate(ConvRelu(transposed=True), X2D, quantizer("per_channel"))
    assert input_map(gm, "conv_transpose2d")["conv_weight"].ch_axis == 1
    converted = quantize(ConvRelu(transposed=True), X2D, quantizer("per_channel"))
    dq_pc = next(n for n in converted.graph.nodes if "dequantize_per_channel" in str(n.target))
    assert dq_pc.args[3] == 1  # axis


def test_conv_with_a_second_user_is_not_fused_with_relu():
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y), y

    gm = annotate(TwoUsers(), X2D, quantizer())
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert annotation(gm, "conv2d").output_qspec is config().output_activation
    # not fused: the standalone relu shares the conv's observer (ExecuTorch 1.5.1's propagation list)
    assert annotation(gm, "relu").output_qspec == SharedQuantizationSpec(conv)


EXPECTED_COUNTS = {
    "static": {"q": 2, "dq": 3},
    "per_channel": {"q": 2, "dq": 2, "dq_pc": 1},
    "dynamic": {},  # only linear is dynamically quantized
    "qat": {"q": 2, "dq": 3},
}


@pytest.mark.parametrize("kind", list(EXPECTED_COUNTS))
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_relu_qdq_counts(kind, transposed):
    model = ConvRelu(transposed=transposed)
    if kind == "dynamic":
        gm = annotate(model, X2D, quantizer(kind))
        assert not any(n.meta.get("quantization_annotation") for n in gm.graph.nodes)
        return
    converted = quantize(model, X2D, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == EXPECTED_COUNTS[kind]


def test_quantized_conv_relu_stays_close_to_float():
    torch.manual_seed(0)
    model = ConvRelu().eval()
    converted = quantize(model, X2D, quantizer(), batches=4)
    with torch.no_grad():
        expected, actual = model(*X2D), converted(*X2D)
    assert (expected - actual).abs().max() < 0.05 * expected.abs().max()
