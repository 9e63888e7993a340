"""conv -> batch_norm [-> relu] (QAT only): annotations, and counts after QAT prepare/convert."""

from __future__ import annotations

import pytest
import torch

from _xnnpack_helpers import annotate, annotation, config, input_map, qdq_counts, quantize, quantizer, quantizer_with

X2D = (torch.randn(2, 3, 8, 8),)
X1D = (torch.randn(2, 3, 8),)


class ConvBn(torch.nn.Module):
    def __init__(self, relu: bool = True, transposed: bool = False, dims: int = 2) -> None:
        super().__init__()
        if dims == 1:
            conv_cls = torch.nn.ConvTranspose1d if transposed else torch.nn.Conv1d
            self.bn = torch.nn.BatchNorm1d(4)
        else:
            conv_cls = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
            self.bn = torch.nn.BatchNorm2d(4)
        self.conv = conv_cls(3, 4, 3)
        self.relu = relu

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y


def _conv_name(gm):
    return next(n.name for n in gm.graph.nodes if n.op == "call_function" and "conv" in n.name)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_qat_conv_bn_annotates_conv_inputs_and_pattern_output(transposed, relu, dims):
    cfg = config("qat")
    gm = annotate(ConvBn(relu, transposed, dims), X1D if dims == 1 else X2D, quantizer("qat"), train=True)
    conv = _conv_name(gm)
    inputs = input_map(gm, conv)
    assert list(inputs) == ["x", "conv_weight", "conv_bias"]
    assert inputs["x"] is cfg.input_activation and inputs["conv_bias"] is None
    assert annotation(gm, conv).output_qspec is None
    if relu:
        assert annotation(gm, "batch_norm") is None
        assert annotation(gm, "relu").output_qspec is cfg.output_activation
    else:
        assert annotation(gm, "batch_norm").output_qspec is cfg.output_activation


def test_ptq_config_does_not_use_the_conv_bn_annotators():
    cfg = config()
    gm = annotate(ConvBn(relu=True), X2D, quantizer(), train=True)
    # the plain conv annotator claims the conv with its own output spec; BN and relu stay float
    assert annotation(gm, "conv2d").output_qspec is cfg.output_activation
    assert annotation(gm, "batch_norm") is None and annotation(gm, "relu") is None


def test_conv_bn_is_not_matched_when_the_conv_has_another_user():
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = annotate(TwoUsers(), X2D, quantizer("qat"), train=True)
    assert annotation(gm, "conv2d").output_qspec is config("qat").output_activation
    assert annotation(gm, "batch_norm") is None


def test_the_batch_norm_counter_update_is_left_alone():
    gm = annotate(ConvBn(), X2D, quantizer("qat"), train=True)
    counter = next(n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("add_"))
    assert counter.meta.get("quantization_annotation") is None


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qat_conv_bn_qdq_counts(relu, per_channel):
    q = quantizer_with(is_qat=True, is_per_channel=per_channel)
    converted = quantize(ConvBn(relu), X2D, q, is_qat=True)
    # conv input, weight (dq only), pattern output; the batch norm is folded into the conv
    assert qdq_counts(converted) == ({"q": 2, "dq": 2, "dq_pc": 1} if per_channel else {"q": 2, "dq": 3})
    assert not any("batch_norm" in str(n.target) for n in converted.graph.nodes)
