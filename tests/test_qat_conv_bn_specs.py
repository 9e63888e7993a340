"""QAT conv-bn with the annotations torchao's QAT tests use: a cat of two conv-bn outputs whose
inputs share the batch norms' output specs, and per-channel weights in a custom integer range
(int32, 0 .. 2**31-1, no ch_axis given)."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Node

import qcore
from qcore import observers
from qcore.observers import FakeQuantize, FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationAnnotation, QuantizationSpec, SharedQuantizationSpec

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
CONVS = (aten.conv2d.default,)
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_no_training.default)


def act_spec() -> QuantizationSpec:
    return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                            observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver))


def calls(model: torch.fx.GraphModule, targets: tuple) -> list[Node]:
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target in targets]


class DoubleConvBnCat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 3, 3, bias=False), torch.nn.BatchNorm2d(3)
        self.conv2, self.bn2 = torch.nn.Conv2d(3, 3, 3, bias=False), torch.nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.cat((self.bn1(self.conv1(x)), self.bn2(self.conv2(x))))


class DoubleConvBnCatQuantizer(Quantizer):
    """conv inputs and weights quantized, each bn output quantized, cat's inputs share them."""

    def annotate(self, model):
        convs, bns = calls(model, CONVS), calls(model, BATCH_NORMS)
        (cat,) = calls(model, (aten.cat.default,))
        for conv, bn in zip(convs, bns):
            conv.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={conv.args[0]: act_spec(), conv.args[1]: act_spec()}, _annotated=True)
            bn.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=act_spec(), _annotated=True)
        cat.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={bns[0]: SharedQuantizationSpec(bns[0]), bns[1]: SharedQuantizationSpec(bns[1])},
            output_qspec=act_spec(), _annotated=True)
        return model

    def validate(self, model):
        pass


def test_cat_of_two_conv_bn_outputs_sharing_their_specs_in_qat():
    torch.manual_seed(0)
    model = DoubleConvBnCat()
    x = torch.randn(2, 3, 5, 5)
    prepared = qcore.prepare_qat_pt2e(torch.export.export(model, (x,)).module(), DoubleConvBnCatQuantizer())
    live = set(prepared.graph.nodes)
    for node in prepared.graph.nodes:  # every annotation names nodes of the prepared graph
        annotation = node.meta.get("quantization_annotation")
        if annotation is None:
            continue
        named = set(annotation.input_qspec_map)
        for spec in [*annotation.input_qspec_map.values(), annotation.output_qspec]:
            if isinstance(spec, SharedQuantizationSpec):
                named.update([spec.edge_or_node] if isinstance(spec.edge_or_node, Node) else spec.edge_or_node)
        assert named <= live
    for _ in range(3):
        prepared(torch.randn(2, 3, 5, 5))
    (cat,) = calls(prepared, (aten.cat.default,))
    first, second = cat.args[0]
    assert {first.op, second.op} == {"call_module"}  # each input is its bn's fake-quantizer, reused
    assert prepared.get_submodule(first.target) is not prepared.get_submodule(second.target)
    qcore.move_exported_model_to_eval(prepared)
    prepared.apply(observers.disable_observer)
    fake_quantized = prepared(x)
    converted = qcore.convert_pt2e(prepared)
    assert calls(converted, BATCH_NORMS) == []  # folded
    (cat,) = calls(converted, (aten.cat.default,))
    assert all(i.target is qd.dequantize_per_tensor.default for i in cat.args[0])
    scales = {float(i.args[1]) for i in cat.args[0]}
    assert len(scales) == 2  # each input keeps its own bn's qparams (shared, not merged)
    step = float(next(iter(cat.users)).args[1])  # the cat output's quantize
    assert (converted(x) - fake_quantized).abs().max().item() <= 2 * step


class ConvBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class Int32WeightQuantizer(Quantizer):
    """torchao's ConvBnInt32WeightQuantizer: per-channel int32 weights over 0 .. 2**31-1, no ch_axis."""

    def annotate(self, model):
        (conv,), (bn,) = calls(model, CONVS), calls(model, BATCH_NORMS)
        weight = QuantizationSpec(dtype=torch.int32, quant_min=0, quant_max=2**31 - 1, qscheme=torch.per_channel_affine,
                                  observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
                                      observer=MovingAveragePerChannelMinMaxObserver))
        conv.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={conv.args[0]: act_spec(), conv.args[1]: weight}, _annotated=True)
        bn.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=act_spec(), _annotated=True)
        return model

    def validate(self, model):
        pass


@pytest.mark.parametrize("fold_quantize", [True, False])
def test_per_channel_int32_weights_in_qat_keep_their_dtype_and_range(fold_quantize):
    torch.manual_seed(0)
    model = ConvBn()
    x = torch.randn(2, 3, 6, 6)
    prepared = qcore.prepare_qat_pt2e(torch.export.export(model, (x,)).module(), Int32WeightQuantizer())
    prepared(x)
    converted = qcore.convert_pt2e(prepared, fold_quantize=fold_quantize)
    (conv,) = calls(converted, CONVS)
    weight_dq = conv.args[1]
    assert weight_dq.target is qd.dequantize_per_channel.default
    assert tuple(weight_dq.args[3:]) == (0, 0, 2**31 - 1, torch.int32)  # axis, qmin, qmax, dtype
    if fold_quantize:
        assert weight_dq.args[0].op == "get_attr"
        assert getattr(converted, weight_dq.args[0].target).dtype == torch.int32
    assert torch.isfinite(converted(x)).all()
