"""Quantizing a model in which one submodule was already QAT-prepared and converted: exporting
it again and quantizing with another quantizer keeps the earlier q/dq (torchao's
``test_reentrant``: 4 quantizes, 5 per-tensor dequantizes, 1 per-channel dequantize)."""

from __future__ import annotations

import warnings
from collections import Counter

import torch

import qcore
from qcore.metrics import sqnr_db
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


class ConvBnRelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class ConvBnReluThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_bn_relu = ConvBnRelu()
        self.linear = torch.nn.Linear(3, 8, bias=False)

    def forward(self, x):
        return self.linear(torch.permute(self.conv_bn_relu(x), (0, 2, 3, 1)))


def qdq_counts(model: torch.fx.GraphModule) -> Counter:
    return Counter(n.target for n in model.graph.nodes if n.op == "call_function" and n.target in (
        qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default))


def subsequence(targets: list, wanted: list) -> bool:
    it = iter(targets)
    return all(any(t is w for t in it) for w in wanted)


def test_a_converted_submodule_keeps_its_qdq_when_the_whole_model_is_quantized_again():
    torch.manual_seed(0)
    model = ConvBnReluThenLinear()
    x = torch.randn(3, 3, 10, 10)
    qat = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.conv_bn_relu = torch.export.export(model.conv_bn_relu, (x,)).module()
        model.conv_bn_relu = qcore.prepare_qat_pt2e(model.conv_bn_relu, qat)
        model(x)
        model.conv_bn_relu = qcore.convert_pt2e(model.conv_bn_relu)
        expected = model(x)

        linear_only = XNNPACKQuantizer().set_module_type(torch.nn.Linear, get_symmetric_quantization_config(is_per_channel=False))
        exported = torch.export.export(model, (x,)).module()
        prepared = qcore.prepare_pt2e(exported, linear_only)
        prepared(x)
        converted = qcore.convert_pt2e(prepared)

    assert qdq_counts(converted) == {qd.quantize_per_tensor.default: 4, qd.dequantize_per_tensor.default: 5,
                                     qd.dequantize_per_channel.default: 1}
    targets = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert subsequence(targets, [qd.dequantize_per_tensor.default, aten.conv2d.default, aten.relu.default,
                                 qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default,
                                 aten.linear.default, qd.quantize_per_tensor.default])
    assert sqnr_db(expected, converted(x)) > 25  # only the linear's quantization added
