"""linear + add with another tensor [+ relu] in the x86 recipe (torchao's
``_annotate_linear_binary_unary``: the add's other input stays float), static, dynamic, QAT and
dynamic QAT; and a linear (or post-op) module called at several sites, which falls back to lone
linears as in torchao. Counts equal torchao's X86InductorQuantizer where it is installed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

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


def linear() -> nn.Linear:
    return nn.Linear(16, 16)


class LinearAdd(nn.Module):
    """linear(x) + other [-> relu], other: relu(x) ("left"/"right") or linear2(x) ("both")."""

    def __init__(self, other: str = "left", relu: bool = False, inplace: bool = False) -> None:
        super().__init__()
        self.linear, self.linear2, self.other, self.relu, self.inplace = linear(), linear(), other, relu, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = self.linear2(x) if self.other == "both" else torch.relu(x)
        if self.inplace:
            y = self.linear(x)
            y += other
        else:
            y = other + self.linear(x) if self.other == "right" else self.linear(x) + other
        return torch.relu(y) if self.relu else y


class LinearOfLinearAdded(nn.Module):
    """tmp = linear(x); tmp + linear2(tmp)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear2 = linear(), linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tmp = self.linear(x)
        return tmp + self.linear2(tmp)


class SerialLinearAddReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.linear2, self.linear3, self.linear4 = linear(), linear(), linear(), linear()
        self.relu, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.linear(x)
        res1 = self.relu(self.linear2(x1) + self.linear3(x1))
        return self.relu2(self.linear4(res1) + res1)


class LinearAddInput(nn.Module):
    """relu(linear(x) + y), y a second graph input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = linear()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x) + y)


class SharedLinear(nn.Module):
    """One linear module called at ``calls`` sites, each followed by a fusable post-op: ``add``
    (x + linear(x)), ``add_relu`` (relu(x + linear(x))), ``relu`` (an nn.ReLU module, also reused)
    or ``gelu`` (nn.GELU)."""

    def __init__(self, post_op: str = "add", calls: int = 2) -> None:
        super().__init__()
        self.linear, self.post_op, self.calls = linear(), post_op, calls
        self.relu, self.gelu = nn.ReLU(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            if self.post_op == "add":
                x = x + self.linear(x)
            elif self.post_op == "add_relu":
                x = torch.relu(x + self.linear(x))
            elif self.post_op == "relu":
                x = self.relu(self.linear(x))
            else:
                x = self.gelu(self.linear(x))
        return x


class ReusedReLU(nn.Module):
    """Two linears, one nn.ReLU module after each: the post-op module is the reused one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = linear(), linear(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.b(self.relu(self.a(x))))


X = (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),)
XY = X + (torch.randn(2, 16, generator=torch.Generator().manual_seed(1)),)
MODES = {"static": {}, "dynamic": {"is_dynamic": True}, "qat": {"is_qat": True}, "dynamic qat": {"is_qat": True, "is_dynamic": True}}


def global_only(q, c):
    return q.set_global(c)


def counts(q: int, dq: int, dqc: int, choose: int = 0) -> dict[str, int]:
    return {"quantize_per_tensor": q, "dequantize_per_tensor": dq, "dequantize_per_channel": dqc, "choose_qparams": choose}


# name -> (model, example, static/QAT counts, dynamic counts); torchao 0.18 gives the same.
# Dynamic: one choose_qparams + quantize + dequantize per quantized tensor (no per-edge dequantize).
CASES = {
    "add left": (LinearAdd, X, counts(1, 1, 1), counts(1, 1, 1, 1)),
    "add right": (lambda: LinearAdd("right"), X, counts(1, 1, 1), counts(1, 1, 1, 1)),
    "add both": (lambda: LinearAdd("both"), X, counts(1, 2, 2), counts(1, 1, 2, 1)),
    "add both in place": (lambda: LinearAdd("both", inplace=True), X, counts(1, 2, 2), counts(1, 1, 2, 1)),
    "add relu left": (lambda: LinearAdd(relu=True), X, counts(1, 1, 1), counts(1, 1, 1, 1)),
    "add relu both": (lambda: LinearAdd("both", relu=True), X, counts(1, 2, 2), counts(1, 1, 2, 1)),
    "add relu both in place": (lambda: LinearAdd("both", relu=True, inplace=True), X, counts(1, 2, 2), counts(1, 1, 2, 1)),
    "linear of linear added": (LinearOfLinearAdded, X, counts(2, 2, 2), counts(2, 2, 2, 2)),
    "serial linear add relu": (SerialLinearAddReLU, X, counts(3, 4, 4), counts(3, 3, 4, 3)),
    "add a graph input, relu": (LinearAddInput, XY, counts(1, 1, 1), counts(1, 1, 1, 1)),
    # reused modules: lone linears, each reading a quantized input
    "shared linear, add": (SharedLinear, X, counts(2, 2, 2), counts(2, 2, 2, 2)),
    "shared linear, add relu": (lambda: SharedLinear("add_relu"), X, counts(2, 2, 2), counts(2, 2, 2, 2)),
    "shared linear, relu": (lambda: SharedLinear("relu"), X, counts(2, 2, 2), counts(2, 2, 2, 2)),
    "shared linear, gelu": (lambda: SharedLinear("gelu"), X, counts(2, 2, 2), counts(2, 2, 2, 2)),
    "shared linear, 3 calls": (lambda: SharedLinear("add_relu", calls=3), X, counts(3, 3, 3), counts(3, 3, 3, 3)),
    "reused relu": (ReusedReLU, X, counts(2, 2, 2), counts(2, 2, 2, 2)),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_linear_add_counts(name, mode):
    model, example, static, dynamic = CASES[name]
    torch.manual_seed(0)
    kwargs = MODES[mode]
    converted = ours(model(), example, global_only, **kwargs)
    assert qdq_counts(converted) == (dynamic if kwargs.get("is_dynamic") else static)


@pytest.mark.parametrize("name", ["add left", "add relu both", "add a graph input, relu"])
def test_the_add_input_stays_float(name):
    """torchao inserts no q/dq before the add's other input (its accuracy note): the add adds
    the float linear output and the float other tensor."""
    model, example, _, _ = CASES[name]
    torch.manual_seed(0)
    converted = ours(model(), example, global_only)
    for add in calls(converted, "add"):
        assert not any(is_dequantize(a) for a in add.args), add.format_node()


def _flags(model: nn.Module, example: tuple) -> dict[str, bool]:
    gm = torch.export.export(model.eval(), example).module()
    X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()).annotate(gm)
    return {n.name: n.meta["quantization_annotation"]._is_output_of_quantized_pattern
            for n in gm.graph.nodes if "quantization_annotation" in n.meta and n.meta["quantization_annotation"]._annotated}


def test_linear_add_relu_is_one_partition():
    assert _flags(LinearAdd(relu=True), X) == {"linear": False, "add": False, "relu_1": True}


@pytest.mark.parametrize("post_op", ["add", "add_relu", "relu", "gelu"])
def test_a_reused_linear_falls_back_to_lone_linears(post_op):
    """Each call site of the shared module is a lone linear, the pattern's output; the post-ops
    stay unclaimed (torchao's guard against source partitions with several outputs)."""
    flags = _flags(SharedLinear(post_op), X)
    assert flags == {"linear": True, "linear_1": True}


def test_a_reused_post_op_module_falls_back_too():
    assert _flags(ReusedReLU(), X) == {"linear": True, "linear_1": True}


def test_a_functional_post_op_in_a_loop_of_distinct_linears_still_fuses():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fcs = nn.ModuleList([linear(), linear()])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for fc in self.fcs:
                x = torch.relu(fc(x))
            return x

    assert _flags(Loop(), X) == {"linear": False, "relu": True, "linear_1": False, "relu_1": True}


@pytest.mark.torchao
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_linear_add_matches_torchao(name, mode):
    model, example, static, dynamic = CASES[name]
    torch.manual_seed(0)
    kwargs = MODES[mode]
    expected = dynamic if kwargs.get("is_dynamic") else static
    assert assert_matches_torchao(model(), example, global_only, **kwargs) == expected


@pytest.mark.torchao
@pytest.mark.parametrize("post_op", ["add", "relu"])
def test_reused_linear_annotation_matches_torchao(post_op):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    gm = torch.export.export(SharedLinear(post_op).eval(), X).module()
    ao_x86.X86InductorQuantizer().set_global(ao_x86.get_default_x86_inductor_quantization_config()).annotate(gm)
    theirs = {n.name: n.meta["quantization_annotation"]._is_output_of_quantized_pattern
              for n in gm.graph.nodes if "quantization_annotation" in n.meta and n.meta["quantization_annotation"]._annotated}
    assert _flags(SharedLinear(post_op), X) == theirs


@pytest.mark.parametrize("name", ["shared linear, add relu", "serial linear add relu", "add a graph input, relu"])
def test_lowered_linear_add_matches_the_qdq_program(name):
    model, example, _, _ = CASES[name]
    torch.manual_seed(0)
    converted = convert(model(), example, X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()))
    lowered = qcore.lower(converted, backend="onednn", example_inputs=example)
    assert not calls(lowered, "linear")  # every linear runs on oneDNN
    assert not calls(lowered, "add")  # every add fused into its linear (the reused module's too)
    with torch.no_grad():
        diff = float((converted(*example) - lowered(*example)).abs().max())
    assert diff <= largest_step(converted) * 1.01 + 1e-5
