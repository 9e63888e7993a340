"""max_pool2d, cat and reshape on uint8 data, under both sharing recipes (the default "torchao"
and the opt-in "sqnr"); the average pools of the default recipe: test_onednn_int8_in_int8_out.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qcore.records import LoweringContext

from _onednn_helpers import aten, assert_close_to_reference, calls, count, counters, lower, onednn, qdq_count, quantize, skip_range_clamp

from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
from qcore_onednn_x86.lowering.lower_quantized_cat import lower_quantized_cat
from qcore_onednn_x86.lowering.lower_quantized_max_pool2d import lower_quantized_max_pool2d


RECIPES = pytest.mark.parametrize("recipe", X86InductorQuantizer.SHARING_RECIPES)


def recipe_quantizer(recipe: str) -> X86InductorQuantizer:
    return X86InductorQuantizer(sharing_recipe=recipe).set_global(get_default_x86_inductor_quantization_config())


class ConvPool(torch.nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 1)
        self.pool = pool

    def forward(self, x):
        return self.conv2(self.pool(torch.relu(self.conv(x))))


@pytest.mark.parametrize(
    "pool,kernel,stride,padding",
    [
        (lambda x: F.max_pool2d(x, 2), [2, 2], [2, 2], [0, 0]),
        (lambda x: F.max_pool2d(x, 3, 2, 1), [3, 3], [2, 2], [1, 1]),
    ],
)
@RECIPES
def test_max_pool2d_runs_on_uint8(pool, kernel, stride, padding, recipe):
    example = (torch.randn(2, 3, 12, 12),)
    converted = quantize(ConvPool(pool), example, recipe_quantizer(recipe))
    lowered = lower(converted, example)
    (qpool,) = calls(lowered, torch.ops.quantized.max_pool2d.default)
    assert qpool.args[1:6] == (kernel, stride, padding, [1, 1], False)
    assert skip_range_clamp(qpool.args[0]).target == onednn.qconv2d_pointwise.default
    assert qdq_count(lowered) == 1
    assert counters(lowered)["qmaxpool2d_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example)


def test_max_pool2d_with_different_qparams_is_refused():
    example = (torch.randn(2, 3, 12, 12),)
    converted = quantize(ConvPool(lambda x: F.max_pool2d(x, 2)), example)
    pool = calls(converted, aten.max_pool2d.default)[0]
    quant = next(iter(pool.users))
    quant.args = (quant.args[0], quant.args[1] * 2, *quant.args[2:])
    converted.recompile()
    assert lower_quantized_max_pool2d(converted, LoweringContext(backend="onednn")) is False


class ConvCat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.tail = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.tail(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


@RECIPES
def test_cat_concatenates_uint8_tensors(recipe):
    example = (torch.randn(2, 3, 8, 8),)
    converted = quantize(ConvCat(), example, recipe_quantizer(recipe))
    lowered = lower(converted, example)
    (cat,) = calls(lowered, aten.cat.default)
    assert all(skip_range_clamp(i).target == onednn.qconv2d_pointwise.default for i in cat.args[0])
    assert all(skip_range_clamp(i).args[13] == torch.uint8 for i in cat.args[0])
    assert qdq_count(lowered) == 1
    assert counters(lowered)["qcat_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example)


def test_cat_with_different_scales_is_left_alone():
    example = (torch.randn(2, 3, 8, 8),)
    converted = quantize(ConvCat(), example)
    cat = calls(converted, aten.cat.default)[0]
    dq = cat.args[0][1]
    dq.args = (dq.args[0], dq.args[1] * 1.5, *dq.args[2:])
    converted.recompile()
    assert lower_quantized_cat(converted, LoweringContext(backend="onednn")) is False


class ConvFlattenLinear(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8 * 3 * 3, 4)
        self.how = how

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.conv(x)), 2)
        if self.how == "flatten":
            y = torch.flatten(y, 1)
        elif self.how == "view":
            y = y.view(y.shape[0], -1)
        else:
            y = y.reshape(y.shape[0], -1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["flatten", "view", "reshape"])
@RECIPES
def test_reshape_between_quantized_ops_runs_on_uint8(how, recipe):
    example = (torch.randn(2, 3, 8, 8),)
    converted = quantize(ConvFlattenLinear(how), example, recipe_quantizer(recipe))
    lowered = lower(converted, example)
    assert counters(lowered)["qreshape_matcher_count"] == 1
    assert count(lowered, aten.view.default) == 0
    assert count(lowered, onednn.qlinear_pointwise.default) == 1
    assert qdq_count(lowered) == 1
    assert_close_to_reference(converted, lowered, example)


def test_view_after_a_channels_last_conv_output_runs():
    """conv -> relu -> linear on the last dim of a 4-D tensor, then a view: no stride error."""

    class ConvLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(6, 5)

        def forward(self, x):
            y = self.fc(torch.relu(self.conv(x)))
            return y.view(y.shape[0], -1)

    example = (torch.randn(2, 3, 6, 6),)
    converted = quantize(ConvLinear(), example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qconv2d_pointwise.default) == 1
    assert count(lowered, onednn.qlinear_pointwise.default) == 1
    assert_close_to_reference(converted, lowered, example)
    # a float view straight after the float-output conv
    class ConvView(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return y.view(y.shape[0], -1)

    converted = quantize(ConvView(), example)
    lowered = lower(converted, example)
    assert count(lowered, aten.view.default) == 0
    assert_close_to_reference(converted, lowered, example, atol=1e-5)
