"""The x86 recipe's ``mul`` (torchao's ``_annotate_mul_tensor``): a mul of two tensors of one
shape gets both inputs quantized (static, QAT and dynamic configs); a scalar (also ``.item()``) or
a broadcast operand leaves it float. Counts equal torchao's X86InductorQuantizer where it is
installed; the lowering keeps ``dq -> mul`` and matches the q/dq program."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcore
from qcore_onednn_x86 import X86InductorQuantizer

from _recipes_helpers import (
    assert_matches_torchao,
    calls,
    convert,
    is_dequantize,
    largest_step,
    ours,
    qdq_counts,
)


class Product(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


class ByRowSums(nn.Module):  # [64, 64] * [64]: broadcast
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y.sum(-1)


class BySum(nn.Module):  # a 0-d tensor: broadcast
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y.sum()


class ByItem(nn.Module):  # a Python scalar at run time
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y.sum().item()


class Square(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * x


class ByScalar(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * 0.5


class ByParameter(nn.Module):  # a constant of the same shape counts as a tensor
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * self.w


class GLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(64, 128), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, -1)
        return self.out(a * torch.sigmoid(b))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class IntegerProduct(nn.Module):  # index arithmetic: never quantized
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = (x > 0).long()
        return x * (mask * mask)


EXAMPLE = (torch.randn(64, 64, generator=torch.Generator().manual_seed(0)),
           torch.randn(64, 64, generator=torch.Generator().manual_seed(1)))


def global_only(q, c):
    return q.set_global(c)


def global_and_mul(q, c):  # torchao's test_annotate_mul_tensor
    return q.set_global(c).set_function_type_qconfig(torch.mul, c)


def counts(q: int, dq: int, dqc: int = 0, choose: int = 0) -> dict[str, int]:
    return {"quantize_per_tensor": q, "dequantize_per_tensor": dq, "dequantize_per_channel": dqc, "choose_qparams": choose}


# model -> (static counts, dynamic counts); torchao 0.18 gives the same (the torchao tests below)
CASES = {
    Product: (counts(2, 2), counts(2, 2, choose=2)),
    ByRowSums: (counts(0, 0), counts(0, 0)),
    BySum: (counts(0, 0), counts(0, 0)),
    ByItem: (counts(0, 0), counts(0, 0)),
    Square: (counts(1, 1), counts(1, 1, choose=1)),  # one edge: x once
    ByScalar: (counts(0, 0), counts(0, 0)),
    # x's quantize stays; the parameter's is folded into a uint8 constant read by its dequantize
    ByParameter: (counts(1, 2), None),
    # x; the two mul inputs; the product for the out linear
    GLU: (counts(4, 4, 2), counts(4, 4, 2, choose=4)),
    # x once for gate and up (two dequantizes); silu(gate) and up for the mul; the product
    SwiGLU: (counts(4, 5, 3), counts(4, 4, 3, choose=4)),
}


QUANTIZED_MUL = {Product, Square, ByParameter, GLU, SwiGLU}


@pytest.mark.parametrize("setup", [global_only, global_and_mul])
@pytest.mark.parametrize("model", list(CASES), ids=lambda m: m.__name__)
def test_mul_counts(model, setup):
    torch.manual_seed(0)
    converted = ours(model(), EXAMPLE, setup)
    assert qdq_counts(converted) == CASES[model][0]
    quantized = model in QUANTIZED_MUL
    for mul in calls(converted, "mul"):
        assert all(is_dequantize(arg) for arg in mul.args if isinstance(arg, torch.fx.Node)) is quantized, mul.format_node()


@pytest.mark.parametrize("model", [m for m, (_, dynamic) in CASES.items() if dynamic is not None], ids=lambda m: m.__name__)
def test_mul_counts_dynamic(model):
    torch.manual_seed(0)
    assert qdq_counts(ours(model(), EXAMPLE, global_only, is_dynamic=True)) == CASES[model][1]


def test_mul_by_a_parameter_under_a_dynamic_config():
    # torchao folds the parameter's run-time quantize into a constant but keeps its choose_qparams
    # (1 quantize); qcore folds no dynamic quantize (2): both dequantize both operands
    torch.manual_seed(0)
    assert qdq_counts(ours(ByParameter(), EXAMPLE, global_only, is_dynamic=True)) == counts(2, 2, choose=2)


def test_qat_glu_counts_equal_the_static_ones():
    torch.manual_seed(0)
    assert qdq_counts(ours(SwiGLU(), EXAMPLE, global_only, is_qat=True)) == CASES[SwiGLU][0]


def test_an_integer_mul_is_never_quantized():
    """torchao's histogram observer fails on it (static) and its dynamic config quantizes it."""
    for dynamic in (False, True):
        converted = ours(IntegerProduct(), EXAMPLE, global_and_mul, is_dynamic=dynamic)
        assert qdq_counts(converted) == counts(0, 0)


def test_mul_is_flagged_output_of_quantized_pattern_and_none_keeps_it_float():
    config = X86InductorQuantizer.default_config()
    gm = torch.export.export(Product(), EXAMPLE).module()
    X86InductorQuantizer().set_global(config).annotate(gm)
    (mul,) = calls(gm, "mul")
    annotation = mul.meta["quantization_annotation"]
    assert annotation._is_output_of_quantized_pattern and set(annotation.input_qspec_map) == set(mul.args)
    converted = ours(Product(), EXAMPLE, lambda q, c: q.set_global(c).set_function_type_qconfig(torch.mul, None))
    assert qdq_counts(converted) == counts(0, 0)


@pytest.mark.torchao
@pytest.mark.parametrize("setup", [global_only, global_and_mul])
@pytest.mark.parametrize("model", list(CASES), ids=lambda m: m.__name__)
def test_mul_matches_torchao(model, setup):
    torch.manual_seed(0)
    assert assert_matches_torchao(model(), EXAMPLE, setup) == CASES[model][0]


@pytest.mark.torchao
@pytest.mark.parametrize("model", [m for m, (_, dynamic) in CASES.items() if dynamic is not None], ids=lambda m: m.__name__)
def test_mul_dynamic_matches_torchao(model):
    torch.manual_seed(0)
    assert assert_matches_torchao(model(), EXAMPLE, global_only, is_dynamic=True) == CASES[model][1]


@pytest.mark.torchao
def test_qat_swiglu_matches_torchao():
    torch.manual_seed(0)
    assert_matches_torchao(SwiGLU(), EXAMPLE, global_only, is_qat=True)


class GatedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class SwiGLUOneInput(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x)


# model, example, counts after lowering: the producers' oneDNN ops write uint8 where their output
# quantize can be fused (silu(gate), up, conv a), the mul reads dequantized inputs, its product's
# quantize feeds the next oneDNN op
LOWERED = {
    "swiglu": (SwiGLUOneInput, (EXAMPLE[0],), counts(2, 2), "qlinear_pointwise", 3),
    "gated convs": (GatedConvs, (torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(2)),), counts(3, 2), "qconv2d_pointwise", 3),
}


@pytest.mark.parametrize("case", list(LOWERED))
def test_lowered_mul_keeps_dq_mul_and_matches_the_qdq_program(case):
    model, example, expected, kernel, kernels = LOWERED[case]
    torch.manual_seed(0)
    converted = convert(model(), example, X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()))
    lowered = qcore.lower(converted, backend="onednn", example_inputs=example)
    assert qdq_counts(lowered) == expected
    assert len(calls(lowered, kernel)) == kernels
    (mul,) = calls(lowered, "mul")
    assert all(is_dequantize(arg) for arg in mul.args)
    (user,) = mul.users
    assert user.target is torch.ops.quantized_decomposed.quantize_per_tensor.default
    with torch.no_grad():
        diff = float((converted(*example) - lowered(*example)).abs().max())
    assert diff <= largest_step(converted) * 1.01 + 1e-5
