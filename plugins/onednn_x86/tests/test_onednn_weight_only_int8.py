"""Weight-only int8 matmul (bf16 x, int8 w, bf16 scales) → aten._weight_int8pack_mm."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import qcore

from _onednn_helpers import aten, count, counters


class WeightOnlyInt8Linear(torch.nn.Module):
    def __init__(self, n: int = 8, k: int = 16, scales_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("weight", torch.randint(-128, 128, (n, k), dtype=torch.int8))
        self.register_buffer("scales", (torch.rand(n) * 0.01 + 0.001).to(scales_dtype))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scales


def lower(gm, example):
    return qcore.lower(gm, backend="onednn", example_inputs=example)


def check(gm: torch.fx.GraphModule, example: tuple) -> None:
    lowered = lower(gm, example)
    assert counters(lowered)["woq_matcher_count"] == 1
    assert count(lowered, aten._weight_int8pack_mm.default) == 1
    assert count(lowered, aten.mm.default, aten.linear.default, aten.mul.Tensor) == 0
    with torch.no_grad():
        expected, actual = gm(*example), lowered(*example)
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    # both round to bf16; allow a few bf16 steps of the output's magnitude
    assert (expected.float() - actual.float()).abs().max() <= 0.02 * expected.float().abs().max()


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16)], ids=["2d", "3d"])
def test_exported_linear_form_lowers_to_weight_int8pack_mm(shape):
    example = (torch.randn(*shape, dtype=torch.bfloat16),)
    check(torch.export.export(WeightOnlyInt8Linear(), example).module(), example)


@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16)], ids=["mm", "view-mm-view"])
def test_decomposed_mm_forms_lower_to_weight_int8pack_mm(shape):
    example = (torch.randn(*shape, dtype=torch.bfloat16),)
    gm = make_fx(WeightOnlyInt8Linear())(*example)
    assert count(gm, aten.mm.default) == 1
    check(gm, example)


class WeightOnlyInt8MatmulOfTransposed(WeightOnlyInt8Linear):
    """``matmul`` of a non-contiguous 3-D x: traced as ``expand -> bmm`` with the weight broadcast."""

    def forward(self, x):
        return torch.matmul(x.transpose(0, 1), self.weight.to(x.dtype).t()) * self.scales


@pytest.mark.parametrize("trace", ["make_fx", "export"])
def test_expand_bmm_form_lowers_to_weight_int8pack_mm(trace):
    example = (torch.randn(3, 2, 16, dtype=torch.bfloat16),)
    model = WeightOnlyInt8MatmulOfTransposed()
    if trace == "make_fx":
        gm = make_fx(model)(*example)
    else:  # torch 2.13 decomposes matmul with a view after each expand and after the bmm
        gm = torch.export.export(model, example).run_decompositions().module()
    assert count(gm, aten.bmm.default) == 1 and count(gm, aten.expand.default) == 2
    check(gm, example)
    assert count(lower(gm, example), aten.bmm.default, aten.expand.default) == 0


def test_bmm_with_a_broadcast_activation_is_not_a_linear():
    class BroadcastX(WeightOnlyInt8Linear):
        def forward(self, x):  # x [1, s, k] broadcast against a batched weight [2, k, n]
            return torch.matmul(x, self.weight.to(x.dtype).t().expand(2, 16, 8)) * self.scales

    example = (torch.randn(1, 3, 16, dtype=torch.bfloat16),)
    gm = make_fx(BroadcastX())(*example)
    lowered = lower(gm, example)
    assert "woq_matcher_count" not in counters(lowered)
    with torch.no_grad():
        assert torch.equal(gm(*example), lowered(*example))


def test_float32_activations_or_scales_stay_as_they_are():
    example = (torch.randn(4, 16),)
    gm = torch.export.export(WeightOnlyInt8Linear(scales_dtype=torch.float32), example).module()
    lowered = lower(gm, example)
    assert "woq_matcher_count" not in counters(lowered)
    assert count(lowered, aten._weight_int8pack_mm.default) == 0
    with torch.no_grad():
        assert torch.equal(gm(*example), lowered(*example))
