"""Scope precedence (module name > module type > operator type > global), None scopes, and
annotator order coming from qcore (patterns), not from registration order."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.plugin_manager import get_plugin_manager
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config
from qcore_xnnpack.annotators import xnnpack_annotators
from _xnnpack_helpers import annotate, annotation, export, input_map, observer_nodes

GLOBAL = get_symmetric_quantization_config()
NAMED = get_symmetric_quantization_config(is_per_channel=True)
TYPED = get_symmetric_quantization_config(act_qmin=-100, act_qmax=100)
OPERATOR = get_symmetric_quantization_config(weight_qmin=-100, weight_qmax=100)


class Sub(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.fc(x)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sub = Sub()
        self.fc = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, image):
        return self.fc(self.sub(x)), torch.relu(self.conv(image))


INPUTS = (torch.randn(2, 4), torch.randn(1, 3, 4, 4))


def _weight_spec(gm, linear_name):
    return input_map(gm, linear_name)[next(k for k in input_map(gm, linear_name) if k.endswith("weight"))]


def test_setters_return_the_quantizer():
    q = XNNPACKQuantizer()
    assert q.set_global(GLOBAL) is q
    assert q.set_operator_type(torch.ops.aten.linear.default, GLOBAL) is q
    assert q.set_module_type(torch.nn.Linear, GLOBAL) is q
    assert q.set_module_name("sub", None) is q  # None is allowed in qcore: keep it float


def test_module_name_beats_global():
    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_name("sub", NAMED)
    gm = annotate(Net(), INPUTS, q)
    assert _weight_spec(gm, "linear") is NAMED.weight  # sub.fc
    assert _weight_spec(gm, "linear_1") is GLOBAL.weight  # fc


def test_module_name_beats_module_type_beats_global():
    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_type(Sub, TYPED).set_module_name("sub.fc", NAMED)
    gm = annotate(Net(), INPUTS, q)
    assert _weight_spec(gm, "linear") is NAMED.weight
    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_type(Sub, TYPED)
    gm = annotate(Net(), INPUTS, q)
    assert input_map(gm, "linear")["x"] is TYPED.input_activation
    assert input_map(gm, "linear_1")["linear"] is GLOBAL.input_activation


def test_module_type_beats_operator_type_beats_global():
    q = (
        XNNPACKQuantizer()
        .set_global(GLOBAL)
        .set_operator_type(torch.ops.aten.linear.default, OPERATOR)
        .set_module_type(Sub, TYPED)
    )
    gm = annotate(Net(), INPUTS, q)
    assert input_map(gm, "linear")["x"] is TYPED.input_activation  # inside Sub
    assert _weight_spec(gm, "linear_1") is OPERATOR.weight  # a linear outside Sub
    assert input_map(gm, "conv2d")["image"] is GLOBAL.input_activation  # not a linear


def test_operator_type_alone_annotates_only_that_op():
    q = XNNPACKQuantizer().set_operator_type(torch.ops.aten.linear.default, GLOBAL)
    gm = annotate(Net(), INPUTS, q)
    assert annotation(gm, "linear") is not None and annotation(gm, "linear_1") is not None
    assert annotation(gm, "conv2d") is None


def test_module_type_none_keeps_linears_float():
    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_type(torch.nn.Linear, None)
    gm = annotate(Net(), INPUTS, q)
    assert annotation(gm, "linear") is None and annotation(gm, "linear_1") is None
    assert input_map(gm, "conv2d")["image"] is GLOBAL.input_activation
    prepared = qcore.prepare_pt2e(export(Net(), *INPUTS), q)
    linear = next(n for n in prepared.graph.nodes if n.name == "linear")
    assert not any(a.op == "call_module" for a in linear.args if isinstance(a, torch.fx.Node))
    assert len(observer_nodes(prepared)) == 3  # conv input, conv weight, relu output


def test_module_name_none_keeps_that_submodule_float():
    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_name("sub", None)
    gm = annotate(Net(), INPUTS, q)
    assert annotation(gm, "linear") is None
    assert annotation(gm, "linear_1") is not None


def test_no_config_annotates_nothing():
    with pytest.warns(UserWarning, match="annotated none"):
        prepared = qcore.prepare_pt2e(export(Net(), *INPUTS), XNNPACKQuantizer())
    assert observer_nodes(prepared) == []


def test_a_scope_filter_rejecting_part_of_a_fused_pattern_skips_it():
    from qcore_xnnpack.annotate_conv import annotate_conv_relu

    gm = export(Net(), *INPUTS)
    annotated = annotate_conv_relu(gm, GLOBAL, lambda n: n.name != "relu")
    assert annotated == [] and annotation(gm, "conv2d") is None


def test_annotator_order_does_not_depend_on_registration_order():
    records = xnnpack_annotators()
    ordered = sorted(records, key=lambda a: a.order_key)
    assert [a.name for a in sorted(reversed(records), key=lambda a: a.order_key)] == [a.name for a in ordered]
    names = [a.name for a in get_plugin_manager().annotators("xnnpack")]
    for fused, part in [("conv_bn_relu", "conv_bn"), ("conv_bn", "conv"), ("conv_relu", "conv"),
                        ("linear_relu", "linear"), ("add_relu", "add"), ("mul_relu", "mul"),
                        ("conv_transpose_bn_relu", "conv_transpose_relu"), ("conv", "max_pool2d"),
                        ("add", "cat")]:
        assert names.index(fused) < names.index(part), (fused, part)
    assert names[-1] == "propagate_annotation"


def test_a_second_annotate_run_changes_nothing():
    q = XNNPACKQuantizer().set_global(GLOBAL)
    gm = annotate(Net(), INPUTS, q)
    before = {n.name: (dict(n.meta["quantization_annotation"].input_qspec_map), n.meta["quantization_annotation"].output_qspec)
              for n in gm.graph.nodes if "quantization_annotation" in n.meta}
    q.annotate(gm)
    after = {n.name: (dict(n.meta["quantization_annotation"].input_qspec_map), n.meta["quantization_annotation"].output_qspec)
             for n in gm.graph.nodes if "quantization_annotation" in n.meta}
    assert after == before


def test_module_name_scope_claims_fused_patterns_whose_weights_have_no_module_stack():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.other = Block()

        def forward(self, x):
            return self.other(self.block(x))

    q = XNNPACKQuantizer().set_global(GLOBAL).set_module_name("block", NAMED)
    gm = annotate(Model(), (torch.randn(1, 3, 4, 4),), q)
    assert input_map(gm, "conv2d")["block_conv_weight"] is NAMED.weight
    assert annotation(gm, "relu").output_qspec is NAMED.output_activation
    assert input_map(gm, "conv2d_1")["other_conv_weight"] is GLOBAL.weight
