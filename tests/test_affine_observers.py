"""Observers that convert themselves (``convert(model, observer_node)``, torchao's extension
point) and torchao's affine observers through it: ``quantize_affine`` / ``dequantize_affine``
for per-group weights and dynamic per-token activations (marker ``torchao``; qcore itself never
imports torchao for them)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.fx import Node

import qcore
from qcore.annotation import annotate_input, annotate_output, mark_annotated
from qcore.errors import ConvertError
from qcore.observers import ObserverBase, PerChannelMinMaxObserver
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationSpec
from qcore.testing.graph_ops import assert_graph_ops

aten = torch.ops.aten


# --------------------------------------------------------------------------- an int4 observer with custom ops
@torch.library.custom_op("qcore_test_int4::quantize_per_tensor_int4", mutates_args=())
def quantize_per_tensor_int4(input: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.clamp(torch.round(input / scale) + zero_point, 0, 15).to(torch.uint8)


@quantize_per_tensor_int4.register_fake
def _(input: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(input, dtype=torch.uint8)


@torch.library.custom_op("qcore_test_int4::dequantize_per_tensor_int4", mutates_args=())
def dequantize_per_tensor_int4(input: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (input.to(torch.float32) - zero_point) * scale


@dequantize_per_tensor_int4.register_fake
def _(input: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.empty_like(input, dtype=torch.float32)


INT4 = torch.ops.qcore_test_int4


class Int4Observer(ObserverBase):
    """torchao's test_observer_callback observer: records the range, inserts int4 q/dq ops."""

    def __init__(self, **kwargs) -> None:
        super().__init__(dtype=torch.uint8)
        self.amax = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.amax = max(self.amax, float(x.detach().abs().max()))
        return x

    def calculate_qparams(self):  # what qcore used to call: returns nothing useful
        return None

    def convert(self, model: torch.fx.GraphModule, observer_node: Node) -> None:
        scale = 2 * self.amax / 15
        with model.graph.inserting_before(observer_node):
            q = model.graph.call_function(INT4.quantize_per_tensor_int4.default, (observer_node.args[0], scale, 8))
            dq = model.graph.call_function(INT4.dequantize_per_tensor_int4.default, (q, scale, 8))
        observer_node.replace_all_uses_with(dq)
        model.graph.erase_node(observer_node)


class LazyObserver(Int4Observer):
    def convert(self, model: torch.fx.GraphModule, observer_node: Node) -> None:
        pass  # forgets to replace its node


class AddQuantizer(Quantizer):
    def __init__(self, spec: QuantizationSpec) -> None:
        self.spec = spec

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target is aten.add.Tensor:
                annotate_input(node, node.args[0], self.spec)
                annotate_input(node, node.args[1], self.spec)
                annotate_output(node, self.spec)
                mark_annotated([node])
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


class Add(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


def _int4_spec(observer) -> QuantizationSpec:
    return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                            observer_or_fake_quant_ctr=observer)


def _prepared(model: torch.nn.Module, example: tuple, quantizer: Quantizer) -> torch.fx.GraphModule:
    prepared = qcore.prepare_pt2e(torch.export.export(copy.deepcopy(model).eval(), example).module(), quantizer)
    prepared(*example)
    return prepared


def test_observer_with_convert_replaces_its_own_node():
    example = (torch.randn(1, 3, 5, 5), torch.randn(1, 3, 5, 5))
    converted = qcore.convert_pt2e(_prepared(Add(), example, AddQuantizer(_int4_spec(Int4Observer))))
    # torchao's counts: both inputs and the output
    assert_graph_ops(converted, {"quantize_per_tensor_int4": 3, "dequantize_per_tensor_int4": 3,
                                 "quantize_per_tensor": 0, "dequantize_per_tensor": 0, "add": 1})
    order = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    add_at = order.index(aten.add.Tensor)
    assert order[:add_at].count(INT4.dequantize_per_tensor_int4.default) == 2
    assert order[add_at + 1] is INT4.quantize_per_tensor_int4.default
    assert not any(n.op == "call_module" for n in converted.graph.nodes if "activation_post_process" in str(n.target))
    x, y = example
    scale_in = 2 * float(torch.cat([x, y]).abs().max()) / 15  # the shared-free inputs: one observer each
    out = converted(*example)
    expected = x + y
    assert (out - expected).abs().max() <= 3 * scale_in  # 4-bit: about a step per operand and output


def test_convert_that_leaves_its_node_is_one_line_error():
    example = (torch.randn(2, 4), torch.randn(2, 4))
    prepared = _prepared(Add(), example, AddQuantizer(_int4_spec(LazyObserver)))
    with pytest.raises(ConvertError, match=r"^LazyObserver\.convert\(model, observer_node\) left its node "
                                           r"'activation_post_process_\d+' in the graph; it must replace") as info:
        qcore.convert_pt2e(prepared)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- torchao's affine observers
class Linear128(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(128, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LinearQuantizer(Quantizer):
    def __init__(self, act: QuantizationSpec, weight: QuantizationSpec) -> None:
        self.act, self.weight = act, weight

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target is aten.linear.default:
                annotate_input(node, node.args[0], self.act)
                annotate_input(node, node.args[1], self.weight)
                mark_annotated([node])
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


def affine_spec(granularity) -> QuantizationSpec:
    """uint8 symmetric through torchao's affine min/max observer at ``granularity`` (torchao imported here)."""
    from torchao.quantization.pt2e._affine_quantization import AffineQuantizedMinMaxObserver
    from torchao.quantization.pt2e.observer import MappingType

    return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=None,
                            observer_or_fake_quant_ctr=AffineQuantizedMinMaxObserver.with_args(
                                target_dtype=torch.uint8, mapping_type=MappingType.SYMMETRIC, granularity=granularity))


def _sqnr(expected: torch.Tensor, actual: torch.Tensor) -> float:
    expected, actual = expected.detach(), actual.detach()
    return float(20 * torch.log10(expected.norm() / (expected - actual).norm()))


@pytest.mark.torchao
def test_per_group_weight_and_per_token_activation_with_affine_observers():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.observer import PerGroup, PerToken

    spec = affine_spec

    torch.manual_seed(0)
    model = Linear128()
    example = (torch.randn(5, 128),)
    prepared = _prepared(model, example, LinearQuantizer(spec(PerToken()), spec(PerGroup(group_size=64))))
    converted = qcore.convert_pt2e(prepared, fold_quantize=False)
    assert_graph_ops(converted, {"quantize_affine": 2, "dequantize_affine": 2, "quantize_per_tensor": 0,
                                 "dequantize_per_tensor": 0, "linear": 1})
    blocks = {n.args[0].name: tuple(n.args[1]) for n in converted.graph.nodes
              if n.op == "call_function" and n.target in (torch.ops.torchao.quantize_affine, torch.ops.torchao.quantize_affine.default)}
    assert sorted(blocks.values()) == [(1, 64), (1, 128)]  # weight: one row x a group of 64; input: per token
    out = converted(*example)
    assert _sqnr(model(*example), out) > 30
    # the observers' own ops, run by hand, give the same output
    weight_q = [n for n in converted.graph.nodes if n.op == "call_function"
                and n.target in (torch.ops.torchao.quantize_affine, torch.ops.torchao.quantize_affine.default) and n.args[0].op == "get_attr"]
    assert len(weight_q) == 1 and converted.get_parameter(weight_q[0].args[0].target) is not model.linear.weight


@pytest.mark.torchao
def test_dynamic_per_token_activation_with_per_channel_weight():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e._affine_quantization import AffineQuantizedMovingAverageMinMaxObserver
    from torchao.quantization.pt2e.observer import MappingType, PerToken

    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=None, is_dynamic=True,
                           observer_or_fake_quant_ctr=AffineQuantizedMovingAverageMinMaxObserver.with_args(
                               target_dtype=torch.int8, mapping_type=MappingType.SYMMETRIC,
                               granularity=PerToken(), averaging_constant=1))
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=PerChannelMinMaxObserver)
    torch.manual_seed(0)
    model = Linear128()
    example = (torch.randn(5, 128),)
    converted = qcore.convert_pt2e(_prepared(model, example, LinearQuantizer(act, weight)))
    # torchao's test_dynamic_affine_act_per_channel_weights
    assert_graph_ops(converted, {"choose_qparams_affine": 1, "getitem": 2, "quantize_affine": 1,
                                 "dequantize_affine": 1, "dequantize_per_channel": 1, "quantize_per_channel": 0})
    other = torch.randn(5, 128) * 5  # qparams chosen per token at run time (5x the calibration range)
    assert _sqnr(model(other), converted(other)) > 30


@pytest.mark.torchao
def test_folded_affine_weight_is_named_as_torchao_names_it():
    """fold_quantize=True folds the weight's quantize_affine into an int constant named
    ``_frozen_param0`` (torchao's constant folding name; the float ``linear_weight`` is gone);
    fold_quantize=False keeps ``linear_weight`` and no ``_frozen_param``. Both compute the same."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.observer import PerGroup, PerToken

    spec = affine_spec

    torch.manual_seed(0)
    model = Linear128()
    example = (torch.randn(5, 128),)
    prepared = _prepared(model, example, LinearQuantizer(spec(PerToken()), spec(PerGroup(group_size=128))))
    folded = qcore.convert_pt2e(copy.deepcopy(prepared), fold_quantize=True)
    unfolded = qcore.convert_pt2e(copy.deepcopy(prepared), fold_quantize=False)
    assert "_frozen_param0" in folded.code and "linear_weight" not in folded.code
    assert "_frozen_param0" not in unfolded.code and "linear_weight" in unfolded.code
    assert folded._frozen_param0.dtype == torch.uint8
    assert_graph_ops(folded, {"quantize_affine": 1, "dequantize_affine": 2})  # the activation's stays
    torch.testing.assert_close(folded(*example), unfolded(*example))
