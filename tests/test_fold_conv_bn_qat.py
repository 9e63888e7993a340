"""Folding batch norm into the conv after QAT convert (``qcore/passes/fold_conv_bn_qat.py``)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.fx import GraphModule

import qcore
from qcore.passes.fold_conv_bn_qat import fold_conv_bn_qat
from qcore.passes.qdq_ops import DEQUANTIZE_OPS, QUANTIZE_OPS, qd
from test_fuse_conv_bn_qat import (
    CONV_KINDS,
    ConvBn,
    ConvBnQuantizer,
    SharedConv,
    calls,
    conv_node,
    example_input,
    export,
    qat_config,
)

aten = torch.ops.aten


def minmax_configs() -> tuple[ConvBnQuantizer, ConvBnQuantizer]:
    """QAT and PTQ quantizers that compute qparams the same way (min/max, per-channel weights)."""
    from qcore import observers

    qat = qat_config(
        act_ctor=observers.FakeQuantize.with_args(observer=observers.MinMaxObserver),
        weight_ctor=observers.FakeQuantize.with_args(observer=observers.PerChannelMinMaxObserver),
    )
    ptq = qat_config(act_ctor=observers.MinMaxObserver, weight_ctor=observers.PerChannelMinMaxObserver, is_qat=False)
    from test_fuse_conv_bn_qat import transposed_weight_spec

    qat_transposed = transposed_weight_spec(qat, observers.FakeQuantize, observers.PerChannelMinMaxObserver)
    return ConvBnQuantizer(qat, transposed_weight=qat_transposed), ConvBnQuantizer(ptq)


def calibration_batches(kind: str, n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(*CONV_KINDS[kind][2], generator=generator) for _ in range(n)]


def qat_converted(model: torch.nn.Module, kind: str, quantizer: ConvBnQuantizer, fold_quantize: bool = True) -> GraphModule:
    """prepare_qat_pt2e, calibrate in eval mode with fake quantization off, convert."""
    from qcore import observers

    batches = calibration_batches(kind)
    prepared = qcore.prepare_qat_pt2e(export(model, batches[0]), quantizer)
    qcore.move_exported_model_to_eval(prepared)
    prepared.apply(observers.disable_fake_quant)
    for batch in batches:
        prepared(batch)
    prepared.apply(observers.enable_fake_quant)
    return qcore.convert_pt2e(prepared, fold_quantize=fold_quantize)


def prefolded(model: ConvBn, kind: str) -> torch.nn.Module:
    folded = copy.deepcopy(model).eval()
    folded.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(folded.conv, folded.bn, transpose=kind.startswith("conv_transpose"))
    folded.bn = torch.nn.Identity()
    return folded


def ptq_converted(model: torch.nn.Module, kind: str, quantizer: ConvBnQuantizer) -> GraphModule:
    batches = calibration_batches(kind)
    prepared = qcore.prepare_pt2e(export(model, batches[0], train=False), quantizer)
    for batch in batches:
        prepared(batch)
    return qcore.convert_pt2e(prepared)


def op_counts(gm: GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.name != "_guards_fn")


def output_scale(gm: GraphModule) -> float:
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    dq = output.args[0][0]
    assert dq.target is qd.dequantize_per_tensor.default
    return float(dq.args[1])


# ----------------------------------------------------------------------------- against PTQ
@pytest.mark.parametrize("kind", list(CONV_KINDS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_folded_qat_model_matches_ptq_on_the_prefolded_model(kind, bias, relu):
    model = ConvBn(kind, bias=bias, relu=relu)
    qat_quantizer, ptq_quantizer = minmax_configs()
    qat = qat_converted(model, kind, qat_quantizer)
    ptq = ptq_converted(prefolded(model, kind), kind, ptq_quantizer)

    assert calls(qat, aten.batch_norm.default) == []
    assert op_counts(qat) == op_counts(ptq)  # same q/dq structure, conv (+relu), nothing else
    conv = conv_node(qat)
    assert conv.args[2] is not None and conv.args[2].op == "get_attr"  # folded bias
    assert conv.args[3:] == conv_node(ptq).args[3:]
    step = output_scale(ptq)
    for x in calibration_batches(kind, 2):
        assert (qat(x) - ptq(x)).abs().max().item() <= step * 1.001


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d"])
def test_weight_qdq_keep_what_qat_learned(kind):
    from qcore import observers

    model = ConvBn(kind, bias=False)
    qat_quantizer, _ = minmax_configs()
    batches = calibration_batches(kind)
    prepared = qcore.prepare_qat_pt2e(export(model, batches[0]), qat_quantizer)
    qcore.move_exported_model_to_eval(prepared)
    for batch in batches:
        prepared(batch)
    weight_fq = prepared.get_submodule(conv_node(prepared).args[1].target)
    scale, zero_point = weight_fq.calculate_qparams()
    prepared.apply(observers.disable_observer)
    expected = prepared(batches[0])

    converted = qcore.convert_pt2e(prepared, fold_quantize=False)
    conv = conv_node(converted)
    dq = conv.args[1]
    q = dq.args[0]
    assert dq.target is qd.dequantize_per_channel.default and q.target is qd.quantize_per_channel.default
    assert q.args[3:] == dq.args[3:] == (1 if kind == "conv_transpose2d" else 0, -127, 127, torch.int8)
    torch.testing.assert_close(getattr(converted, q.args[1].target), scale)
    torch.testing.assert_close(getattr(converted, q.args[2].target).to(zero_point.dtype), zero_point)

    # the weight q now reads the folded weight, a plain constant
    folded_weight = _attr(converted, q.args[0].target)
    bn = model.bn
    sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    view = [1, -1, 1, 1] if kind == "conv_transpose2d" else [-1, 1, 1, 1]
    torch.testing.assert_close(folded_weight, model.conv.weight * sf.reshape(view))
    bias = _attr(converted, conv.args[2].target)
    torch.testing.assert_close(bias, bn.bias - bn.running_mean * sf)
    assert conv.args[2].target == "conv.weight_bias"
    step = output_scale(converted)
    assert (converted(batches[0]) - expected).abs().max().item() <= step * 1.001


def _attr(gm: GraphModule, target: str) -> torch.Tensor:
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def test_folded_weight_is_stored_as_int8_and_no_batch_norm_state_remains():
    model = ConvBn("conv2d", bias=True)
    qat_quantizer, _ = minmax_configs()
    converted = qat_converted(model, "conv2d", qat_quantizer)
    conv = conv_node(converted)
    weight = conv.args[1].args[0]
    assert weight.op == "get_attr" and _attr(converted, weight.target).dtype == torch.int8
    names = {name for name, _ in converted.named_parameters()} | {name for name, _ in converted.named_buffers()}
    assert not any(name.startswith("bn.") for name in names), names
    assert calls(converted, aten.add_.Tensor) == []  # the batch counter went with the batch norm


# ----------------------------------------------------------------------------- safety
def test_convert_never_writes_the_users_tensors():
    model = ConvBn("conv2d", bias=True)
    qat_quantizer, _ = minmax_configs()
    from qcore import observers

    x = example_input("conv2d")
    prepared = qcore.prepare_qat_pt2e(export(model, x), qat_quantizer)
    prepared(x)
    qcore.move_exported_model_to_eval(prepared)
    prepared.apply(observers.disable_observer)
    before = {name: t.detach().clone() for name, t in list(prepared.named_parameters()) + list(prepared.named_buffers())}
    expected = prepared(x)
    converted = qcore.convert_pt2e(prepared)
    after = dict(list(prepared.named_parameters()) + list(prepared.named_buffers()))
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=f"{name} changed")
    assert calls(prepared, aten.batch_norm.default)  # the prepared model still has its batch norm
    torch.testing.assert_close(prepared(x), expected)
    assert converted(x).shape == expected.shape


def test_module_called_twice_folds_each_call_into_its_own_weight():
    model = SharedConv()
    x = torch.randn(2, 3, 6, 6)
    qat_quantizer, _ = minmax_configs()
    from qcore import observers

    prepared = qcore.prepare_qat_pt2e(export(model, x), qat_quantizer)
    qcore.move_exported_model_to_eval(prepared)
    prepared.apply(observers.disable_fake_quant)
    prepared(x)
    prepared.apply(observers.enable_fake_quant)
    prepared.apply(observers.disable_observer)
    expected = prepared(x)
    converted = qcore.convert_pt2e(prepared, fold_quantize=False)
    assert calls(converted, aten.batch_norm.default) == []
    convs = calls(converted, aten.conv2d.default)
    weights = [c.args[1].args[0].args[0] for c in convs]
    assert weights[0].target != weights[1].target
    w1, w2 = (_attr(converted, w.target) for w in weights)
    for w, bn in ((w1, model.bn1), (w2, model.bn2)):
        sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        torch.testing.assert_close(w, model.conv.weight * sf.reshape(-1, 1, 1, 1))
    step = output_scale(converted)
    assert (converted(x) - expected).abs().max().item() <= step * 1.001


def test_fold_without_a_fused_pattern_changes_nothing():
    gm = export(ConvBn("conv2d"), example_input("conv2d"), train=False)
    code = gm.code
    assert fold_conv_bn_qat(gm) is False
    assert gm.code == code


def test_fold_also_when_the_model_is_converted_in_train_mode():
    model = ConvBn("conv1d", bias=False)
    qat_quantizer, _ = minmax_configs()
    x = example_input("conv1d")
    prepared = qcore.prepare_qat_pt2e(export(model, x), qat_quantizer)
    prepared(x)
    converted = qcore.convert_pt2e(prepared)  # never moved to eval
    assert calls(converted, aten.batch_norm.default) == []
    assert len(calls(converted, *QUANTIZE_OPS)) == 2 and len(calls(converted, *DEQUANTIZE_OPS)) == 3


def _bias_scale(obs_or_fqs):
    act, weight = obs_or_fqs
    act_scale, _ = act.calculate_qparams()
    weight_scale, _ = weight.calculate_qparams()
    scale = (act_scale * weight_scale).to(torch.float32)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


class DerivedBiasQuantizer(ConvBnQuantizer):
    """ConvBnQuantizer plus an int32 bias whose scale is input scale x weight scale."""

    def annotate(self, model: GraphModule) -> GraphModule:
        from qcore.annotation import ANNOTATION_KEY
        from qcore.passes.conv_bn_patterns import conv_kinds

        super().annotate(model)
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in conv_kinds() and len(node.args) > 2 and node.args[2] is not None:
                node.meta[ANNOTATION_KEY].input_qspec_map[node.args[2]] = qcore.DerivedQuantizationSpec(
                    derived_from=[(node.args[0], node), (node.args[1], node)],
                    derive_qparams_fn=_bias_scale,
                    dtype=torch.int32,
                    quant_min=-(2**31),
                    quant_max=2**31 - 1,
                    qscheme=torch.per_channel_symmetric,
                    ch_axis=0,
                )
        return model


def test_quantized_bias_quantizes_the_folded_bias():
    from qcore import observers

    qat_quantizer, _ = minmax_configs()
    model = ConvBn("conv2d", bias=True)
    batches = calibration_batches("conv2d")
    prepared = qcore.prepare_qat_pt2e(export(model, batches[0]), DerivedBiasQuantizer(qat_quantizer.config))
    qcore.move_exported_model_to_eval(prepared)
    prepared.apply(observers.disable_fake_quant)
    for batch in batches:
        prepared(batch)
    prepared.apply(observers.enable_fake_quant)
    prepared.apply(observers.disable_observer)
    expected = prepared(batches[0])
    converted = qcore.convert_pt2e(prepared, fold_quantize=False)
    bias_dq = conv_node(converted).args[2]
    assert bias_dq.target is qd.dequantize_per_channel.default and bias_dq.args[-1] == torch.int32
    bias = _attr(converted, bias_dq.args[0].args[0].target)
    bn = model.bn
    sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(bias, (model.conv.bias - bn.running_mean) * sf + bn.bias)
    assert (converted(batches[0]) - expected).abs().max().item() <= output_scale(converted) * 1.001
