"""The x86 annotation recipe: which edges get which spec, and the q/dq it leads to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import qcore
from qcore.annotation import ANNOTATION_KEY
from qcore.spec import SharedQuantizationSpec

from _onednn_helpers import QDQ_OPS, aten, calls, count, export, qd, quantize, x86_quantizer

from qcore_onednn_x86 import get_default_x86_inductor_quantization_config


def annotated(model, example, config=None):
    gm = export(model, example)
    quantizer = x86_quantizer(config)
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
    assert (x_spec.dtype, x_spec.quant_min, x_spec.quant_max) == (torch.uint8, 0, 255)
    assert (w_spec.dtype, w_spec.qscheme, w_spec.ch_axis) == (torch.int8, torch.per_channel_symmetric, 0)
    assert conv_ann.input_qspec_map[conv.args[2]] is None  # bias stays float
    assert conv_ann.output_qspec is None
    assert relu.meta[ANNOTATION_KEY]._annotated and relu.meta[ANNOTATION_KEY].output_qspec is None


def test_max_pool2d_shares_its_input_observer():
    gm = annotated(ConvReluPool(), (torch.randn(1, 3, 8, 8),))
    pool = calls(gm, aten.max_pool2d.default)[0]
    ann = pool.meta[ANNOTATION_KEY]
    assert ann.output_qspec == SharedQuantizationSpec((pool.args[0], pool))


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
