"""QAT conv-bn fusion (``qcore/passes/fuse_conv_bn_qat.py``, the core's ``fuse_qat``).

The tests use :class:`ConvBnQuantizer`, a small quantizer defined here (core tests do not
depend on a backend plugin); ``test_fold_conv_bn_qat`` and ``test_qat_digits`` import it.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Optional

import attrs
import pytest
import torch
from torch.fx import GraphModule, Node

import qcore
from qcore.annotation import ANNOTATION_KEY, annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.passes.conv_bn_patterns import conv_kinds
from qcore.passes.fuse_conv_bn_qat import fuse_conv_bn_qat
from qcore.spec import DerivedQuantizationSpec, QuantizationConfig, QuantizationSpec, SharedQuantizationSpec

aten = torch.ops.aten


# ----------------------------------------------------------------------------- test quantizer
def qat_config(act_ctor: Any = None, weight_ctor: Any = None, is_qat: bool = True) -> QuantizationConfig:
    """int8 affine activations, int8 symmetric per-channel weights (axis set per conv)."""
    from qcore import observers

    if act_ctor is None:
        act_ctor = observers.FusedMovingAvgObsFakeQuantize if is_qat else observers.HistogramObserver
    if weight_ctor is None:
        weight_ctor = (
            observers.FusedMovingAvgObsFakeQuantize.with_args(observer=observers.MovingAveragePerChannelMinMaxObserver)
            if is_qat
            else observers.PerChannelMinMaxObserver
        )
    act = QuantizationSpec(
        dtype=torch.int8, observer_or_fake_quant_ctr=act_ctor, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        observer_or_fake_quant_ctr=weight_ctor,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return QuantizationConfig(act, act, weight, None, is_qat)


def transposed_weight_spec(config: QuantizationConfig, fake_quantize: Any = None, observer: Any = None) -> QuantizationSpec:
    """The weight spec on output-channel axis 1. For QAT a plain FakeQuantize: torch's fused
    moving-average kernel supports per-channel fake quantization on axis 0 only."""
    if config.is_qat:
        from qcore import observers

        fake_quantize = fake_quantize or observers.FakeQuantize
        observer = observer or observers.MovingAveragePerChannelMinMaxObserver
        return attrs.evolve(config.weight, observer_or_fake_quant_ctr=fake_quantize.with_args(observer=observer), ch_axis=1)
    return attrs.evolve(config.weight, ch_axis=1)


def ptq_config() -> QuantizationConfig:
    return qat_config(is_qat=False)


def _single_user(node: Node, targets: tuple) -> Optional[Node]:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if user.op == "call_function" and user.target in targets else None


BATCH_NORM = (aten.batch_norm.default,)
RELU = (aten.relu.default, aten.relu_.default)


class ConvBnQuantizer(qcore.Quantizer):
    """Annotates ``conv [-> batch_norm] [-> relu]`` and ``linear [-> relu]``.

    conv/linear: input -> activation spec, weight -> weight spec (channel axis 1 for transposed
    convs), bias -> ``bias_spec`` (default float); the last node of the pattern -> activation
    spec. Batch norm itself is not annotated: QAT fusion folds it into the conv.
    """

    def __init__(self, config: Optional[QuantizationConfig] = None, bias_spec: Any = None, transposed_weight: Any = None) -> None:
        self.config = config if config is not None else qat_config()
        self.bias_spec = bias_spec
        self.transposed_weight = transposed_weight or transposed_weight_spec(self.config)

    def annotate(self, model: GraphModule) -> GraphModule:
        config = self.config
        for node in list(model.graph.nodes):
            kind = conv_kinds().get(node.target) if node.op == "call_function" else None
            is_linear = node.op == "call_function" and node.target is aten.linear.default
            if (kind is None and not is_linear) or is_annotated(node):
                continue
            weight_spec = self.transposed_weight if kind is not None and kind.transposed else config.weight
            annotate_input(node, node.args[0], config.input_activation)
            annotate_input(node, node.args[1], weight_spec)
            if len(node.args) > 2 and isinstance(node.args[2], Node):
                annotate_input(node, node.args[2], self.bias_spec)
            last = node
            bn = _single_user(node, BATCH_NORM) if kind is not None else None
            if bn is not None:
                last = bn
            relu = _single_user(last, RELU)
            if relu is not None:
                last = relu
            annotate_output(last, config.output_activation)
            mark_annotated([n for n in {node, bn, relu, last} if n is not None])
        return model

    def validate(self, model: GraphModule) -> None:
        return None


# ----------------------------------------------------------------------------- models
CONV_KINDS = {
    "conv1d": (torch.nn.Conv1d, torch.nn.BatchNorm1d, (2, 3, 10)),
    "conv2d": (torch.nn.Conv2d, torch.nn.BatchNorm2d, (2, 3, 8, 8)),
    "conv_transpose1d": (torch.nn.ConvTranspose1d, torch.nn.BatchNorm1d, (2, 3, 10)),
    "conv_transpose2d": (torch.nn.ConvTranspose2d, torch.nn.BatchNorm2d, (2, 3, 8, 8)),
    "conv3d": (torch.nn.Conv3d, torch.nn.BatchNorm3d, (2, 3, 5, 5, 5)),
    "conv_transpose3d": (torch.nn.ConvTranspose3d, torch.nn.BatchNorm3d, (2, 3, 4, 4, 4)),
}


def randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.randn(n, generator=generator))
                    module.bias.copy_(torch.randn(n, generator=generator))
    return model


class ConvBn(torch.nn.Module):
    """conv [-> bn] [-> relu] with non-default literals, eps and momentum."""

    def __init__(self, kind: str, bias: bool = True, relu: bool = True, groups: int = 1, eps: float = 1e-3, momentum: float = 0.2) -> None:
        super().__init__()
        conv_cls, bn_cls, _ = CONV_KINDS[kind]
        out_channels = 4
        kwargs: dict = dict(stride=2, padding=1, dilation=1, groups=groups, bias=bias)
        if kind.startswith("conv_transpose"):
            kwargs["output_padding"] = 1
        in_channels = 3 if groups == 1 else 2 * groups
        self.conv = conv_cls(in_channels, out_channels, 3, **kwargs)
        self.bn = bn_cls(out_channels, eps=eps, momentum=momentum)
        self.relu = torch.nn.ReLU() if relu else torch.nn.Identity()
        randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def example_input(kind: str, groups: int = 1) -> torch.Tensor:
    shape = list(CONV_KINDS[kind][2])
    if groups > 1:
        shape[1] = 2 * groups
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def export(model: torch.nn.Module, x: torch.Tensor, train: bool = True) -> GraphModule:
    return torch.export.export(copy.deepcopy(model).train(train), (x,)).module()


def annotated(model: torch.nn.Module, x: torch.Tensor, quantizer: Any = None) -> GraphModule:
    """Exported in train mode and annotated, ready for fusion (no observers)."""
    gm = export(model, x)
    return (quantizer or _StaticQuantizer()).annotate(gm)


class _StaticQuantizer(ConvBnQuantizer):
    """ConvBnQuantizer with torch.ao fake-quant classes: annotation tests need no qcore.observers."""

    def __init__(self, bias_spec: Any = None) -> None:
        from torch.ao.quantization import fake_quantize as ao_fq
        from torch.ao.quantization import observer as ao_observer

        config = qat_config(
            act_ctor=ao_fq.FusedMovingAvgObsFakeQuantize,
            weight_ctor=ao_fq.FusedMovingAvgObsFakeQuantize.with_args(observer=ao_observer.MovingAveragePerChannelMinMaxObserver),
        )
        transposed = transposed_weight_spec(config, ao_fq.FakeQuantize, ao_observer.MovingAveragePerChannelMinMaxObserver)
        super().__init__(config, bias_spec=bias_spec, transposed_weight=transposed)


def calls(gm: GraphModule, *targets) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def conv_node(gm: GraphModule) -> Node:
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in conv_kinds()]
    return conv


# ----------------------------------------------------------------------------- structure
def test_graph_without_batch_norm_is_left_alone():
    gm = export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.randn(1, 3, 8, 8))
    code = gm.code
    assert fuse_conv_bn_qat(gm) is False
    assert gm.code == code


@pytest.mark.parametrize("kind", list(CONV_KINDS))
@pytest.mark.parametrize("bias", [True, False])
def test_fused_graph_structure(kind, bias):
    model = ConvBn(kind, bias=bias)
    x = example_input(kind)
    gm = annotated(model, x)
    conv_before = conv_node(gm)
    literals = conv_before.args[3:]
    spec_values = list(conv_before.meta[ANNOTATION_KEY].input_qspec_map.values())
    stack = conv_before.meta["nn_module_stack"]

    assert fuse_conv_bn_qat(gm) is True
    conv = conv_node(gm)
    assert conv is conv_before and conv.args[3:] == literals  # stride, padding, ... kept

    scaled_weight = conv.args[1]
    assert scaled_weight.target is aten.mul.Tensor and scaled_weight.args[0].op == "get_attr"
    (sf,) = [n for n in gm.graph.nodes if n.meta.get("qcore_qat_role") == "scale_factor"]
    std = sf.args[1]
    assert sf.target is aten.div.Tensor and std.target is aten.sqrt.default
    assert std.args[0].target is aten.add.Tensor and std.args[0].args[1] == 1e-3  # the user's eps
    weight_view = scaled_weight.args[1]
    axis = 1 if kind.startswith("conv_transpose") else 0
    assert weight_view.args[1] == [-1 if i == axis else 1 for i in range(len(weight_view.args[1]))]

    (bn,) = calls(gm, aten.batch_norm.default)
    assert bn.args[5:] == (True, 0.2, 1e-3, False)  # training, the user's momentum and eps
    if bias:
        zero_bias = conv.args[2]
        assert zero_bias.target is aten.zeros_like.default
        add = bn.args[0]
        assert add.target is aten.add.Tensor and add.args[0].target is aten.div.Tensor and add.args[0].args[0] is conv
        assert list(conv.meta[ANNOTATION_KEY].input_qspec_map) == [conv.args[0], scaled_weight, zero_bias]
    else:
        assert len(conv.args) < 3 or conv.args[2] is None
        assert calls(gm, aten.zeros_like.default) == []
        assert bn.args[0].target is aten.div.Tensor and bn.args[0].args[0] is conv
        assert list(conv.meta[ANNOTATION_KEY].input_qspec_map) == [conv.args[0], scaled_weight]
    assert list(conv.meta[ANNOTATION_KEY].input_qspec_map.values()) == spec_values
    assert scaled_weight.meta["nn_module_stack"] == stack
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function" and n.name != "_guards_fn")
    (relu,) = calls(gm, aten.relu.default)
    assert relu.meta[ANNOTATION_KEY].output_qspec is not None


def test_grouped_transposed_conv_scales_each_output_channel():
    model = ConvBn("conv_transpose2d", groups=2)
    x = example_input("conv_transpose2d", groups=2)
    gm = annotated(model, x)
    assert fuse_conv_bn_qat(gm)
    for training in (True, False):
        reference = export(model, x, train=training)
        fused = copy.deepcopy(gm)
        qcore.move_exported_model_to_train(fused) if training else qcore.move_exported_model_to_eval(fused)
        torch.testing.assert_close(fused(x), reference(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- float numerics
@pytest.mark.parametrize("kind", list(CONV_KINDS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_fused_float_graph_computes_the_same(kind, bias, relu):
    model = ConvBn(kind, bias=bias, relu=relu)
    x = example_input(kind)
    gm = annotated(model, x)
    fuse_conv_bn_qat(gm)
    reference = export(model, x)
    torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=1e-5)
    # running statistics moved the same way (the user's momentum)
    torch.testing.assert_close(gm.bn.running_mean, reference.bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gm.bn.running_var, reference.bn.running_var, atol=1e-6, rtol=1e-5)
    qcore.move_exported_model_to_eval(gm)
    qcore.move_exported_model_to_eval(reference)
    torch.testing.assert_close(gm(x), reference(x), atol=1e-5, rtol=1e-5)


def _without_fake_quant(prepared: GraphModule) -> GraphModule:
    from qcore import observers

    prepared.apply(observers.disable_fake_quant)
    prepared.apply(observers.disable_observer)
    return prepared


@pytest.mark.parametrize("kind", list(CONV_KINDS))
@pytest.mark.parametrize("bias", [True, False])
def test_prepared_qat_model_with_fake_quant_off_equals_float(kind, bias):
    model = ConvBn(kind, bias=bias)
    x = example_input(kind)
    prepared = qcore.prepare_qat_pt2e(export(model, x), ConvBnQuantizer())
    _without_fake_quant(prepared)
    float_train = copy.deepcopy(model).train()
    torch.testing.assert_close(prepared(x), float_train(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prepared.bn.running_var, float_train.bn.running_var, atol=1e-6, rtol=1e-5)
    qcore.move_exported_model_to_eval(prepared)
    torch.testing.assert_close(prepared(x), float_train.eval()(x), atol=1e-5, rtol=1e-5)
    qcore.move_exported_model_to_train(prepared)
    torch.testing.assert_close(prepared(x), float_train.train()(x), atol=1e-5, rtol=1e-5)


def test_weight_fake_quant_observes_the_scaled_weight():
    model = ConvBn("conv2d")
    x = example_input("conv2d")
    prepared = qcore.prepare_qat_pt2e(export(model, x), ConvBnQuantizer())
    conv = conv_node(prepared)
    weight_fq = conv.args[1]
    assert weight_fq.op == "call_module"
    assert weight_fq.args[0].meta.get("qcore_qat_role") == "scaled_weight"
    assert all(u.op != "call_module" for n in prepared.graph.nodes if n.op == "get_attr" and n.target == "conv.weight" for u in n.users)


def test_prepare_qat_leaves_the_users_model_alone():
    model = ConvBn("conv2d")
    x = example_input("conv2d")
    gm = export(model, x)
    code = gm.code
    qcore.prepare_qat_pt2e(gm, ConvBnQuantizer())
    assert gm.code == code
    assert not any(n.meta.get("qcore_qat_role") for n in gm.graph.nodes)


# ----------------------------------------------------------------------------- annotations
def test_shared_and_derived_specs_follow_the_new_weight_edge():
    model = ConvBn("conv2d")
    x = example_input("conv2d")
    gm = _StaticQuantizer().annotate(export(model, x))
    conv = conv_node(gm)
    x_node, weight, bias = conv.args[:3]

    def scale_of(obs_or_fqs):  # never called: the test only checks where the spec points
        raise AssertionError

    derived = DerivedQuantizationSpec(
        derived_from=[(x_node, conv), (weight, conv)],
        derive_qparams_fn=scale_of,
        dtype=torch.int32,
        quant_min=-(2**31),
        quant_max=2**31 - 1,
        qscheme=torch.per_tensor_symmetric,
    )
    annotation = conv.meta[ANNOTATION_KEY]
    annotation.input_qspec_map[bias] = derived
    (relu,) = calls(gm, aten.relu.default)
    relu.meta[ANNOTATION_KEY].output_qspec = SharedQuantizationSpec((weight, conv))

    fuse_conv_bn_qat(gm)
    scaled_weight, zero_bias = conv.args[1], conv.args[2]
    new_derived = conv.meta[ANNOTATION_KEY].input_qspec_map[zero_bias]
    assert new_derived.derived_from == [(x_node, conv), (scaled_weight, conv)]
    assert new_derived.dtype == torch.int32 and new_derived.derive_qparams_fn is scale_of
    assert relu.meta[ANNOTATION_KEY].output_qspec == SharedQuantizationSpec((scaled_weight, conv))


def test_a_spec_naming_something_else_is_rejected():
    model = ConvBn("conv2d")
    x = example_input("conv2d")
    gm = _StaticQuantizer().annotate(export(model, x))
    (relu,) = calls(gm, aten.relu.default)
    spec = SharedQuantizationSpec(relu)
    object.__setattr__(spec, "edge_or_node", "relu")  # a bad spec slipped past validation
    relu.meta[ANNOTATION_KEY].output_qspec = spec
    with pytest.raises(ValueError, match="expected a Node or an"):
        fuse_conv_bn_qat(gm)


# ----------------------------------------------------------------------------- shared modules
class SharedConv(torch.nn.Module):
    """One conv module called twice, each call followed by its own batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.bn2 = torch.nn.BatchNorm2d(3, eps=1e-4)
        randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv(x)))
        return self.bn2(self.conv(y))


def test_module_called_twice_gets_one_scaled_weight_per_call():
    model = SharedConv()
    x = torch.randn(2, 3, 6, 6)
    gm = annotated(model, x)
    assert fuse_conv_bn_qat(gm)
    convs = calls(gm, aten.conv2d.default)
    assert len(convs) == 2
    scaled = [c.args[1] for c in convs]
    assert scaled[0] is not scaled[1]
    assert scaled[0].args[0] is scaled[1].args[0]  # the one weight tensor, scaled twice
    for training in (True, False):
        fused, reference = copy.deepcopy(gm), export(model, x, train=training)
        qcore.move_exported_model_to_train(fused) if training else qcore.move_exported_model_to_eval(fused)
        torch.testing.assert_close(fused(x), reference(x), atol=1e-5, rtol=1e-5)


def test_prepared_shared_module_with_fake_quant_off_equals_float():
    model = SharedConv()
    x = torch.randn(2, 3, 6, 6)
    prepared = _without_fake_quant(qcore.prepare_qat_pt2e(export(model, x), ConvBnQuantizer()))
    torch.testing.assert_close(prepared(x), copy.deepcopy(model).train()(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- plugins
class LinearBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.linear = torch.nn.Linear(4, 5)
        self.bn1d = torch.nn.BatchNorm1d(5)
        randomize_batch_norm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.bn1d(self.linear(y))


def _linear_bn_plugin(calls_seen: list) -> types.ModuleType:
    """A third-party plugin whose ``fuse_qat`` adds linear -> batch_norm fusion."""
    plugin = types.ModuleType("qcore_test_linear_bn_plugin")

    @qcore.hookimpl
    def fuse_qat(model, is_qat):
        graph = model.graph
        already_fused = any(n.meta.get("qcore_qat_role") == "scaled_weight" for n in graph.nodes)
        calls_seen.append(already_fused)
        changed = False
        for bn in calls(model, aten.batch_norm.default):
            linear = bn.args[0]
            if not (linear.op == "call_function" and linear.target is aten.linear.default and len(linear.users) == 1):
                continue
            x, weight, bias = linear.args
            running_var, bn_weight, eps = bn.args[4], bn.args[1], bn.args[7]
            with graph.inserting_before(linear):
                std = graph.call_function(aten.sqrt.default, (graph.call_function(aten.add.Tensor, (running_var, eps)),))
                sf = graph.call_function(aten.div.Tensor, (bn_weight, std))
                scaled = graph.call_function(aten.mul.Tensor, (weight, graph.call_function(aten.reshape.default, (sf, [-1, 1]))))
                zero = graph.call_function(aten.zeros_like.default, (bias,))
            linear.args = (x, scaled, zero)
            annotation = linear.meta[ANNOTATION_KEY]
            annotation.input_qspec_map = {
                {weight: scaled, bias: zero}.get(k, k): v for k, v in annotation.input_qspec_map.items()
            }
            with graph.inserting_before(bn):
                out = graph.call_function(aten.add.Tensor, (graph.call_function(aten.div.Tensor, (linear, sf)), bias))
            bn.replace_input_with(linear, out)
            changed = True
        model.recompile()
        return changed

    plugin.fuse_qat = fuse_qat
    return plugin


def test_a_third_party_fuse_qat_runs_after_the_core_and_both_fusions_hold():
    seen: list = []
    plugin = _linear_bn_plugin(seen)
    manager = qcore.get_plugin_manager()
    manager.pm.register(plugin, name="test_linear_bn")
    try:
        model = LinearBn()
        x = torch.randn(4, 3, 6, 6)
        prepared = qcore.prepare_qat_pt2e(export(model, x), ConvBnQuantizer())
    finally:
        manager.pm.unregister(plugin)
    assert seen == [True]  # the core's conv-bn fusion had already run
    (linear,) = calls(prepared, aten.linear.default)
    weight_fq = linear.args[1]
    assert weight_fq.op == "call_module" and weight_fq.args[0].target is aten.mul.Tensor
    assert conv_node(prepared).args[1].args[0].meta.get("qcore_qat_role") == "scaled_weight"
    _without_fake_quant(prepared)
    torch.testing.assert_close(prepared(x), copy.deepcopy(model).train()(x), atol=1e-5, rtol=1e-5)


def test_xnnpack_quantizer_conv_bn_is_fused_too():
    xnnpack = pytest.importorskip("qcore_xnnpack")
    model = ConvBn("conv2d")
    x = example_input("conv2d")
    quantizer = xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    prepared = qcore.prepare_qat_pt2e(export(model, x), quantizer)
    assert conv_node(prepared).args[1].args[0].meta.get("qcore_qat_role") == "scaled_weight"
    _without_fake_quant(prepared)
    torch.testing.assert_close(prepared(x), copy.deepcopy(model).train()(x), atol=1e-5, rtol=1e-5)
