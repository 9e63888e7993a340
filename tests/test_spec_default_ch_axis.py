"""A per-channel QuantizationSpec written without ch_axis takes its observer's default axis, as
torchao's prepare does (ported specs written that way work), with a warning where that axis is
not the op's channel axis (a transposed conv's weight has its output channels on axis 1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.ao.quantization import observer as ao_observer

import qcore
from qcore.annotation import annotate_input, mark_annotated
from qcore.observers import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver
from qcore.passes.insert_observers import QuantizationWarning
from qcore.quantizer import Quantizer
from qcore.spec import DerivedQuantizationSpec, QuantizationSpec

aten = torch.ops.aten
WEIGHTED = (aten.conv2d.default, aten.conv_transpose2d.input, aten.linear.default)


class WeightQuantizer(Quantizer):
    """Activation per tensor, weight with the given spec, on every conv/linear."""

    def __init__(self, weight: QuantizationSpec, is_qat: bool = False) -> None:
        ctr = FakeQuantize.with_args(observer=MinMaxObserver) if is_qat else MinMaxObserver
        self.act = QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=ctr, qscheme=torch.per_tensor_affine)
        self.weight = weight

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in WEIGHTED:
                annotate_input(node, node.args[0], self.act)
                annotate_input(node, node.args[1], self.weight)
                mark_annotated([node])
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


def weight_spec(ctr, ch_axis=None) -> QuantizationSpec:
    return QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=ctr, quant_min=-127, quant_max=127,
                            qscheme=torch.per_channel_symmetric, ch_axis=ch_axis)


def quantized(model: torch.nn.Module, x: torch.Tensor, quantizer: Quantizer, qat: bool = False) -> torch.fx.GraphModule:
    exported = torch.export.export(model, (x,)).module()
    prepare = qcore.prepare_qat_pt2e if qat else qcore.prepare_pt2e
    prepared = prepare(exported, quantizer)
    prepared(x)
    return qcore.convert_pt2e(prepared, fold_quantize=False)


def per_channel_dequantizes(converted: torch.fx.GraphModule) -> list:
    """(axis, scales) of every dequantize_per_channel."""
    found = []
    for node in converted.graph.nodes:
        if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
            scales = getattr(converted, node.args[1].target)
            found.append((node.args[3], scales.clone()))
    return found


def test_spec_without_ch_axis_is_accepted_and_derived_still_needs_one():
    spec = weight_spec(PerChannelMinMaxObserver)
    assert spec.ch_axis is None
    graph = torch.fx.Graph()
    source = graph.placeholder("x")
    # a derived observer has no default axis of its own, so a derived spec keeps needing one
    with pytest.raises(ValueError, match="per-channel qscheme .* needs ch_axis"):
        DerivedQuantizationSpec(derived_from=[source], derive_qparams_fn=lambda obs: obs, dtype=torch.int32,
                                qscheme=torch.per_channel_symmetric)


@pytest.mark.parametrize("ctr", [PerChannelMinMaxObserver, ao_observer.PerChannelMinMaxObserver], ids=["qcore", "torch.ao"])
def test_ptq_default_axis_equals_axis_0(ctr):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)  # conv and linear weights: axis 0 is right
        default = per_channel_dequantizes(quantized(model, x, WeightQuantizer(weight_spec(ctr))))
    explicit = per_channel_dequantizes(quantized(model, x, WeightQuantizer(weight_spec(ctr, ch_axis=0))))
    assert [axis for axis, _ in default] == [0, 0]
    assert [len(scales) for _, scales in default] == [6, 5]  # one scale per output channel
    for (_, a), (_, b) in zip(default, explicit):
        assert torch.equal(a, b)


def test_qat_fake_quantize_without_ch_axis_uses_its_observers_axis():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).train()
    x = torch.randn(2, 3, 8, 8)
    ctr = FakeQuantize.with_args(observer=PerChannelMinMaxObserver)
    converted = quantized(model, x, WeightQuantizer(weight_spec(ctr), is_qat=True), qat=True)
    found = per_channel_dequantizes(converted)
    assert [axis for axis, _ in found] == [0] and len(found[0][1]) == 4


def test_transposed_conv_weight_warns_and_names_the_axis():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 5, 3)).eval()  # weight [3, 5, 3, 3]
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(QuantizationWarning, match=r"no ch_axis, so the observer's default axis 0 applies.*axis 1: give ch_axis=1"):
        quantized(model, x, WeightQuantizer(weight_spec(PerChannelMinMaxObserver)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantizationWarning)
        converted = quantized(model, x, WeightQuantizer(weight_spec(PerChannelMinMaxObserver, ch_axis=1)))
    found = per_channel_dequantizes(converted)
    assert [axis for axis, _ in found] == [1] and len(found[0][1]) == 5
