"""The x86 annotation recipe: which edges get which spec, and the q/dq it leads to. The
observer-sharing ops of the opt-in ``sharing_recipe="sqnr"`` are tested here; those of the default
(torchao's int8-in-int8-out) in test_onednn_int8_in_int8_out.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qcore
from qcore.annotation import ANNOTATION_KEY
from qcore.spec import DerivedQuantizationSpec

from _onednn_helpers import QDQ_OPS, aten, calls, count, export, qd, quantize, x86_quantizer

from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config


def sqnr_quantizer(config=None) -> X86InductorQuantizer:
    return X86InductorQuantizer(sharing_recipe="sqnr").set_global(config or get_default_x86_inductor_quantization_config())


def annotated(model, example, config=None, recipe="torchao"):
    gm = export(model, example)
    quantizer = x86_quantizer(config) if recipe == "torchao" else sqnr_quantizer(config)
    quantizer.annotate(gm)
    return gm


class ConvReluPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.conv2(torch.cat([y, y], 1)[:, :8])


def test_conv_relu_partition_quantizes_inputs_and_leaves_output_to_the_consumer():
    gm = annotated(ConvReluPool(), (torch.randn(1, 3, 8, 8),))
    conv = calls(gm, aten.conv2d.default)[0]
    relu = calls(gm, aten.relu.default)[0]
    conv_ann = conv.meta[ANNOTATION_KEY]
    x_spec, w_spec = conv_ann.input_qspec_map[conv.args[0]], conv_ann.input_qspec_map[conv.args[1]]
    config = get_default_x86_inductor_quantization_config()  # [0, 255], or [0, 180] on a CPU without VNNI
    assert x_spec == config.input_activation and x_spec.dtype == torch.uint8 and x_spec.quant_min == 0
    assert (w_spec.dtype, w_spec.qscheme, w_spec.ch_axis) == (torch.int8, torch.per_channel_symmetric, 0)
    assert conv_ann.input_qspec_map[conv.args[2]] is None  # bias stays float
    assert conv_ann.output_qspec is None
    assert relu.meta[ANNOTATION_KEY]._annotated and relu.meta[ANNOTATION_KEY].output_qspec is None


def test_sqnr_recipe_max_pool2d_input_takes_the_qparams_of_its_output_observer():
    gm = annotated(ConvReluPool(), (torch.randn(1, 3, 8, 8),), recipe="sqnr")
    pool = calls(gm, aten.max_pool2d.default)[0]
    ann = pool.meta[ANNOTATION_KEY]
    config = get_default_x86_inductor_quantization_config()
    assert ann.output_qspec == config.input_activation
    derived = ann.input_qspec_map[pool.args[0]]
    assert isinstance(derived, DerivedQuantizationSpec) and derived.derived_from == [pool]
    assert (derived.dtype, derived.quant_min, derived.quant_max) == (torch.uint8, 0, config.input_activation.quant_max)


def test_sqnr_recipe_max_pool2d_observer_sees_only_the_pool_output():
    # the input edge's observer derives its qparams and observes nothing: the histogram holds
    # the values max_pool2d lets through, not also the small ones it drops
    class ConvReluPoolConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.conv2(F.max_pool2d(F.relu(self.conv(x)), 2))

    prepared = qcore.prepare_pt2e(export(ConvReluPoolConv(), (torch.randn(2, 3, 8, 8),)), sqnr_quantizer())
    pool = calls(prepared, aten.max_pool2d.default)[0]
    before, after = pool.args[0], next(iter(pool.users))
    assert type(getattr(prepared, before.target)).__name__ == "DerivedObserverOrFakeQuantize"
    prepared(torch.randn(2, 3, 8, 8))
    observer = getattr(prepared, after.target)
    assert observer is not getattr(prepared, before.target)
    assert int(observer.histogram.sum()) == 2 * 8 * 4 * 4  # the pooled tensor's elements only
    converted = qcore.convert_pt2e(prepared)
    pool = calls(converted, aten.max_pool2d.default)[0]
    dq_in, q_out = pool.args[0], next(iter(pool.users))
    assert dq_in.target == qd.dequantize_per_tensor.default and q_out.target == qd.quantize_per_tensor.default
    assert dq_in.args[1:3] == q_out.args[1:3]  # one scale / zero point: the pool runs on uint8


def test_sqnr_recipe_average_pools_stay_float_and_their_consumer_quantizes_the_average():
    class ConvAvgLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = F.avg_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))

    gm = annotated(ConvAvgLinear(), (torch.randn(2, 3, 8, 8),), recipe="sqnr")
    for op in (aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten.flatten.using_ints):
        assert ANNOTATION_KEY not in calls(gm, op)[0].meta, op
    linear = calls(gm, aten.linear.default)[0]
    flatten = calls(gm, aten.flatten.using_ints)[0]
    assert linear.meta[ANNOTATION_KEY].input_qspec_map[flatten] == get_default_x86_inductor_quantization_config().input_activation
    converted = quantize(ConvAvgLinear(), (torch.randn(2, 3, 8, 8),), sqnr_quantizer())
    # q/dq only on the conv input and the linear input: nothing around the pools
    for op in (aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default):
        pool = calls(converted, op)[0]
        assert pool.args[0].target not in QDQ_OPS and all(u.target not in QDQ_OPS for u in pool.users)


def test_conv_relu_pool_gets_the_q_dq_the_old_flow_gave():
    converted = quantize(ConvReluPool(), (torch.randn(1, 3, 8, 8),))
    # x, relu->pool, pool output, cat input... : every quantize has uint8 activations
    quants = calls(converted, qd.quantize_per_tensor.default)
    assert quants and all(q.args[-1] == torch.uint8 for q in quants)
    assert count(converted, qd.dequantize_per_channel.default) == 2
    pool = calls(converted, aten.max_pool2d.default)[0]
    q_after = next(iter(pool.users))
    assert q_after.target == qd.quantize_per_tensor.default
    assert q_after.args[1:3] == pool.args[0].args[1:3]  # same scale / zero point as its input


class ConvAdd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        identity = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(identity) + x)


def test_conv_add_relu_quantizes_the_extra_input():
    gm = annotated(ConvAdd(), (torch.randn(1, 4, 8, 8),))
    add = calls(gm, aten.add.Tensor)[0]
    extra = add.args[1]
    assert add.meta[ANNOTATION_KEY].input_qspec_map[extra].dtype == torch.uint8
    relu = list(add.users)[0]
    assert relu.meta[ANNOTATION_KEY]._annotated


class LinearAdd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x, y):
        return torch.relu(self.fc(x) + y)


def test_linear_add_leaves_the_extra_input_float():
    gm = annotated(LinearAdd(), (torch.randn(2, 8), torch.randn(2, 8)))
    add = calls(gm, aten.add.Tensor)[0]
    assert add.meta[ANNOTATION_KEY]._annotated
    assert add.meta[ANNOTATION_KEY].input_qspec_map == {}


def test_dynamic_config_quantizes_linear_activations_at_run_time():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    example = (torch.randn(2, 8),)
    converted = quantize(model, example, x86_quantizer(get_default_x86_inductor_quantization_config(is_dynamic=True)))
    assert count(converted, qd.choose_qparams.tensor) == 2
    assert count(converted, qd.quantize_per_tensor.tensor) == 2


def test_qat_conv_bn_relu_is_one_partition_with_a_quantized_output():
    class ConvBnRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    example = (torch.randn(2, 3, 8, 8),)
    gm = torch.export.export(ConvBnRelu().train(), example).module()
    x86_quantizer(get_default_x86_inductor_quantization_config(is_qat=True)).annotate(gm)
    conv = calls(gm, aten.conv2d.default)[0]
    bn = calls(gm, aten.batch_norm.default)[0]
    relu = calls(gm, aten.relu.default)[0]
    assert conv.meta[ANNOTATION_KEY].input_qspec_map[conv.args[1]].ch_axis == 0
    assert bn.meta[ANNOTATION_KEY]._annotated
    assert relu.meta[ANNOTATION_KEY].output_qspec.dtype == torch.uint8
    # the same graph with the PTQ config: the QAT-only patterns do not run
    gm2 = torch.export.export(ConvBnRelu().train(), example).module()
    x86_quantizer().annotate(gm2)
    assert ANNOTATION_KEY not in calls(gm2, aten.batch_norm.default)[0].meta or not calls(
        gm2, aten.batch_norm.default)[0].meta[ANNOTATION_KEY]._annotated


def test_module_type_none_keeps_linears_float():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 4))
    example = (torch.randn(1, 3, 8, 8),)
    quantizer = x86_quantizer().set_module_type(torch.nn.Linear, None)
    converted = quantize(model, example, quantizer)
    assert count(converted, qd.dequantize_per_channel.default) == 1


class HandWrittenLinears(torch.nn.Module):
    """``x @ w.t() + b`` (weight [out, in]) and ``torch.matmul(y, v)`` (weight [in, out])."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8))
        self.b = torch.nn.Parameter(torch.randn(16))
        self.v = torch.nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return torch.matmul(torch.relu(x @ self.w.t() + self.b), self.v)


def test_matmul_with_a_constant_weight_is_annotated_as_a_linear():
    gm = annotated(HandWrittenLinears(), (torch.randn(2, 5, 8),))
    config = get_default_x86_inductor_quantization_config()
    first, second = calls(gm, aten.matmul.default)
    (t,) = calls(gm, aten.t.default)
    # x @ w.t(): the weight is quantized per output channel (axis 0) before the transpose,
    # which belongs to the partition
    assert first.meta[ANNOTATION_KEY].input_qspec_map[first.args[0]] == config.input_activation
    assert t.meta[ANNOTATION_KEY].input_qspec_map[t.args[0]] == config.weight
    assert t.meta[ANNOTATION_KEY]._annotated
    # torch.matmul(y, v) with v [in, out]: output channels run along axis 1
    weight_spec = second.meta[ANNOTATION_KEY].input_qspec_map[second.args[1]]
    assert (weight_spec.dtype, weight_spec.qscheme, weight_spec.ch_axis) == (torch.int8, torch.per_channel_symmetric, 1)
    assert second.meta[ANNOTATION_KEY].input_qspec_map[second.args[0]] == config.input_activation
    converted = quantize(HandWrittenLinears(), (torch.randn(2, 5, 8),))
    axes = sorted(n.args[3] for n in calls(converted, qd.dequantize_per_channel.default))
    assert axes == [0, 1]


def test_matmul_of_two_activations_is_not_a_linear():
    class Attention(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2)

    gm = annotated(Attention(), (torch.randn(2, 5, 8), torch.randn(2, 4, 8)))
    assert all(ANNOTATION_KEY not in n.meta for n in calls(gm, aten.matmul.default, aten.transpose.int))


def test_qat_annotates_only_the_axis_0_matmul_weight():
    # the fused QAT fake-quantizer is per channel on axis 0 only: torch.matmul(y, v[in, out]) stays float
    gm = annotated(HandWrittenLinears(), (torch.randn(2, 5, 8),), get_default_x86_inductor_quantization_config(is_qat=True))
    first, second = calls(gm, aten.matmul.default)
    (t,) = calls(gm, aten.t.default)
    assert t.meta[ANNOTATION_KEY].input_qspec_map[t.args[0]].ch_axis == 0
    assert ANNOTATION_KEY not in second.meta


def test_qat_max_pool2d_shares_the_fake_quantizer_of_a_quantized_producer():
    # a QAT conv-bn-relu partition quantizes its own output: the pool shares that fake-quantizer
    # rather than quantizing its input a second time
    class ConvBnReluPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.conv2(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2))

    example = (torch.randn(2, 3, 8, 8),)
    config = get_default_x86_inductor_quantization_config(is_qat=True)
    exported = torch.export.export(ConvBnReluPool().train(), example).module()
    prepared = qcore.prepare_qat_pt2e(exported, x86_quantizer(config))
    pool = calls(prepared, aten.max_pool2d.default)[0]
    before, after = pool.args[0], next(iter(pool.users))
    assert getattr(prepared, before.target) is getattr(prepared, after.target)
    prepared(*example)
    qcore.move_exported_model_to_eval(prepared)
    converted = qcore.convert_pt2e(prepared)
    assert count(converted, qd.quantize_per_tensor.default) == 3  # input, relu/pool (shared), pool output
