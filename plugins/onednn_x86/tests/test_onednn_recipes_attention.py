"""The attention matmuls of the x86 recipe: ``matmul`` of two activations is quantized (every
input, the matmul flagged ``_is_output_of_quantized_pattern``) only where a scope narrower than
the global one asks for it, ``set_function_type_qconfig(torch.matmul, config)`` above all;
counts equal to torchao's X86InductorQuantizer where it is installed; the lowering keeps
``dq -> matmul`` (no oneDNN int8 kernel multiplies two activations) and matches the q/dq program."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcore
from qcore_onednn_x86 import X86InductorQuantizer

from _recipes_helpers import (
    assert_matches_torchao,
    calls,
    is_dequantize,
    is_quantize,
    largest_step,
    ours,
    qdq_counts,
)


class Attention(nn.Module):
    """q, k, v projections, softmax(q @ k^T / sqrt(d)) @ v; with ``heads``, split into heads
    (view + permute) first."""

    def __init__(self, dim: int = 16, heads: int = 0) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.softmax = nn.Softmax(dim=-1)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        if not self.heads:
            return x
        return x.view(*x.shape[:-1], self.heads, self.dim // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.dim**0.5
        return torch.matmul(self.softmax(scores), v)


class AttentionThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = Attention(), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x))


EXAMPLE = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)),)


def global_only(q, c):
    return q.set_global(c)


def matmul_only(q, c):
    return q.set_function_type_qconfig(torch.matmul, c)


def global_and_matmul(q, c):
    return q.set_global(c).set_function_type_qconfig(torch.matmul, c)


def module_name_attn(q, c):
    return q.set_module_name_qconfig("attn", c)


def module_name_over_matmul_none(q, c):
    return q.set_global(c).set_module_name_qconfig("attn", c).set_function_type_qconfig(torch.matmul, None)


def counts(q: int, dq: int, dqc: int, choose: int = 0) -> dict[str, int]:
    return {"quantize_per_tensor": q, "dequantize_per_tensor": dq, "dequantize_per_channel": dqc, "choose_qparams": choose}


# (model, setup, expected counts): torchao 0.18 gives the same (the torchao tests below)
CASES = {
    # x once for the three projections; the matmuls are not in the default recipe
    "global": (Attention, global_only, counts(1, 3, 3)),
    # q, k^T, softmax and v: one quantize and one dequantize each; the projections stay float
    "torch.matmul only": (Attention, matmul_only, counts(4, 4, 0)),
    "global + torch.matmul": (Attention, global_and_matmul, counts(5, 7, 3)),
    "heads, global + torch.matmul": (lambda: Attention(heads=4), global_and_matmul, counts(5, 7, 3)),
    # a module name scope covers the matmuls inside it (torchao's quantizable ops)
    "module name attn": (AttentionThenLinear, module_name_attn, counts(5, 7, 3)),
    "module name over torch.matmul None": (AttentionThenLinear, module_name_over_matmul_none, counts(6, 8, 4)),
}


def matmul_inputs_dequantized(converted: torch.fx.GraphModule) -> list[bool]:
    return [all(is_dequantize(arg) for arg in node.args) for node in calls(converted, "matmul")]


@pytest.mark.parametrize("case", list(CASES))
def test_attention_counts(case):
    model, setup, expected = CASES[case]
    torch.manual_seed(0)
    converted = ours(model(), EXAMPLE, setup)
    assert qdq_counts(converted) == expected
    assert matmul_inputs_dequantized(converted) == ([False, False] if case == "global" else [True, True])


def test_the_matmul_inputs_are_quantized_right_before_it():
    """q -> k -> transpose -> q -> dq -> matmul; softmax -> q -> dq -> matmul; the products float."""
    torch.manual_seed(0)
    converted = ours(Attention(), EXAMPLE, global_and_matmul)
    scores, weighted = calls(converted, "matmul")
    for matmul in (scores, weighted):
        for dequantize in matmul.args:
            assert is_quantize(dequantize.args[0]), dequantize.format_node()
            assert dequantize.args[1:] == dequantize.args[0].args[1:]  # the same scale and zero point
    assert scores.args[1].args[0].args[0].target is torch.ops.aten.transpose.int  # k^T quantized after the transpose
    assert weighted.args[0].args[0].args[0].target is torch.ops.aten.softmax.int
    (div,) = scores.users
    assert div.target is torch.ops.aten.div.Tensor  # the product is not quantized: its consumers decide
    assert not weighted.users or not any(is_quantize(u) for u in weighted.users)


def test_matmuls_are_flagged_output_of_quantized_pattern():
    gm = torch.export.export(Attention().eval(), EXAMPLE).module()
    X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()).set_function_type_qconfig(
        torch.matmul, X86InductorQuantizer.default_config()
    ).annotate(gm)
    for matmul in calls(gm, "matmul"):
        annotation = matmul.meta["quantization_annotation"]
        assert annotation._is_output_of_quantized_pattern and annotation._annotated
        assert set(annotation.input_qspec_map) == set(matmul.args)
        assert all(spec.dtype is torch.uint8 for spec in annotation.input_qspec_map.values())


def test_global_scope_leaves_activation_matmuls_unclaimed_but_a_constant_weight_matmul_is_linear():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.matmul(x, self.w.t())  # linear-like: the x86 recipe's linear
            return torch.matmul(y, y.transpose(-1, -2))  # two activations: not in the default recipe

    gm = torch.export.export(Mixed().eval(), EXAMPLE).module()
    X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()).annotate(gm)
    linear_like, activations = calls(gm, "matmul")
    assert linear_like.meta["quantization_annotation"]._annotated
    assert "quantization_annotation" not in activations.meta


def test_dynamic_scopes_quantize_the_matmul_inputs_at_run_time():
    torch.manual_seed(0)
    converted = ours(Attention(), EXAMPLE, global_and_matmul, is_dynamic=True)
    # x and the four matmul inputs: a choose_qparams each, no static quantize
    assert qdq_counts(converted) == counts(5, 5, 3, choose=5)
    assert matmul_inputs_dequantized(converted) == [True, True]


def test_qat_counts_equal_the_static_ones():
    torch.manual_seed(0)
    assert qdq_counts(ours(Attention(), EXAMPLE, global_and_matmul, is_qat=True)) == counts(5, 7, 3)


@pytest.mark.torchao
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_torchao(case):
    model, setup, expected = CASES[case]
    torch.manual_seed(0)
    assert assert_matches_torchao(model(), EXAMPLE, setup) == expected


@pytest.mark.torchao
@pytest.mark.parametrize("mode", ["dynamic", "qat"])
def test_attention_dynamic_and_qat_match_torchao(mode):
    torch.manual_seed(0)
    assert_matches_torchao(Attention(), EXAMPLE, global_and_matmul, is_qat=mode == "qat", is_dynamic=mode == "dynamic")


def _lowered(model: nn.Module) -> tuple:
    config = X86InductorQuantizer.default_config()  # this CPU's exact ranges: the lowering checks them
    quantizer = X86InductorQuantizer().set_global(config).set_function_type_qconfig(torch.matmul, config)
    from _recipes_helpers import convert

    converted = convert(model, EXAMPLE, quantizer)
    return converted, qcore.lower(converted, backend="onednn", example_inputs=EXAMPLE)


@pytest.mark.parametrize("heads", [0, 4])
def test_lowered_attention_keeps_dq_matmul_and_matches_the_qdq_program(heads):
    torch.manual_seed(0)
    converted, lowered = _lowered(Attention(heads=heads))
    # the projections are oneDNN int8 linears writing uint8 (their output quantize fused), so
    # q, k and v reach their matmul's dequantize as uint8; x's and softmax's quantizes remain
    assert qdq_counts(lowered) == counts(2, 4, 0)
    assert len(calls(lowered, "qlinear_pointwise")) == 3
    assert matmul_inputs_dequantized(lowered) == [True, True]
    for matmul in calls(lowered, "matmul"):
        for dequantize in matmul.args:
            assert dequantize.meta["val"].dtype is torch.float32
            source = dequantize.args[0]
            while source.target in (torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.view.default,
                                    torch.ops.qcore_onednn.clamp_uint8.default):
                source = source.args[0]  # uint8 views of the linear's output
            assert source.target in (torch.ops.onednn.qlinear_pointwise.default, torch.ops.quantized_decomposed.quantize_per_tensor.default)
    with torch.no_grad():
        diff = float((converted(*EXAMPLE) - lowered(*EXAMPLE)).abs().max())
    assert diff <= largest_step(converted) * 1.01 + 1e-5


@pytest.mark.slow
def test_compiled_attention_matches_the_lowered_model_within_one_step():
    config = X86InductorQuantizer.default_config()
    quantizer = X86InductorQuantizer().set_global(config).set_function_type_qconfig(torch.matmul, config)
    from _recipes_helpers import convert

    torch._dynamo.reset()
    torch.manual_seed(0)
    converted = convert(Attention(heads=4), EXAMPLE, quantizer)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=EXAMPLE)
    with torch.no_grad():
        expected = compiled.lowered(*EXAMPLE)
    actual = compiled(*EXAMPLE)
    assert (expected - actual).abs().max() <= largest_step(converted) * 1.01 + 1e-5
    assert compiled.lowered.meta["qcore_lowered"]["counters"]["qlinear_weight_prepack_matcher_count"] == 3
    torch._dynamo.reset()
