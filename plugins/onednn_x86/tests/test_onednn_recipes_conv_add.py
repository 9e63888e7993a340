"""conv2d + add in the x86 recipe, where the add's other input is a conv too, or the conv's own
input (``tmp + conv2(tmp)``, a residual ``conv(x) + x``), and serial conv -> add -> relu chains:
exact q/dq counts and node order, static and QAT, equal to torchao's X86InductorQuantizer where
it is installed; the lowering keeps the q/dq counts' meaning and matches the q/dq program."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcore
from qcore.testing.graph_ops import op_name
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


def conv() -> nn.Conv2d:
    return nn.Conv2d(3, 3, 3, padding=1)


class TwoConvsAdded(nn.Module):
    """conv(x) + conv2(x) [-> relu]: both add inputs from convs of one input."""

    def __init__(self, relu: bool = False, inplace: bool = False) -> None:
        super().__init__()
        self.conv, self.conv2, self.relu, self.inplace = conv(), conv(), relu, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.inplace:
            y += self.conv2(x)
        else:
            y = y + self.conv2(x)
        return torch.relu(y) if self.relu else y


class ConvOfConvAdded(nn.Module):
    """tmp = bn(conv(x)); tmp + bn2(conv2(tmp)): the add's other input is conv2's own input."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv, self.conv2, self.bn, self.bn2, self.inplace = conv(), conv(), nn.BatchNorm2d(3), nn.BatchNorm2d(3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tmp = self.bn(self.conv(x))
        if self.inplace:
            tmp += self.bn2(self.conv2(tmp))
            return tmp
        return tmp + self.bn2(self.conv2(tmp))


class SerialConvAddReLU(nn.Module):
    """x1 = conv(x); res1 = relu(conv2(x1) + conv3(x1)); relu(conv4(res1) + res1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2, self.conv3, self.conv4 = conv(), conv(), conv(), conv()
        self.relu, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv(x)
        res1 = self.relu(self.conv2(x1) + self.conv3(x1))
        return self.relu2(self.conv4(res1) + res1)


class Residual(nn.Module):
    """relu([bn](conv(x)) + x): the add's other input is the conv's own input."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = conv(), nn.BatchNorm2d(3) if bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


class ConvAddOther(nn.Module):
    """conv(x) + relu(x) [-> relu], torchao's "left" case."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.conv, self.relu = conv(), relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x) + torch.relu(x)
        return torch.relu(y) if self.relu else y


SMALL = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)
LARGE = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def global_only(q, c):
    return q.set_global(c)


def counts(q: int, dq: int, dqc: int) -> dict[str, int]:
    return {"quantize_per_tensor": q, "dequantize_per_tensor": dq, "dequantize_per_channel": dqc, "choose_qparams": 0}


# name -> (model, example, static counts, QAT counts); torchao 0.18 gives the same
CASES = {
    # x once for both convs (two dequantizes), conv2's output as the add's int8 accumulator
    "two convs added": (TwoConvsAdded, SMALL, counts(2, 3, 2), counts(2, 3, 2)),
    "two convs added, relu": (lambda: TwoConvsAdded(relu=True), SMALL, counts(2, 3, 2), counts(2, 3, 2)),
    "two convs added in place": (lambda: TwoConvsAdded(inplace=True), SMALL, counts(2, 3, 2), counts(2, 3, 2)),
    # tmp quantized once, read by conv2 and by the add: two dequantizes (QAT: bn's outputs fake-quantized too)
    "conv of conv added": (ConvOfConvAdded, SMALL, counts(2, 3, 2), counts(3, 4, 2)),
    "conv of conv added in place, QAT": (lambda: ConvOfConvAdded(inplace=True), SMALL, None, counts(3, 4, 2)),
    # x, x1 (read by conv2 and conv3), conv3's output, res1 (read by conv4 and the add)
    "serial conv add relu": (SerialConvAddReLU, LARGE, counts(4, 6, 4), counts(4, 6, 4)),
    "residual": (Residual, SMALL, counts(1, 2, 1), counts(1, 2, 1)),
    "residual bn": (lambda: Residual(bn=True), SMALL, counts(1, 2, 1), counts(2, 3, 1)),
    "conv + relu(x)": (ConvAddOther, SMALL, counts(2, 2, 1), counts(2, 2, 1)),
    "conv + relu(x), relu": (lambda: ConvAddOther(relu=True), SMALL, counts(2, 2, 1), counts(2, 2, 1)),
}
STATIC = [name for name, case in CASES.items() if case[2] is not None]


@pytest.mark.parametrize("name", STATIC)
def test_conv_add_counts(name):
    model, example, expected, _ = CASES[name]
    torch.manual_seed(0)
    assert qdq_counts(ours(model(), example, global_only)) == expected


@pytest.mark.parametrize("name", list(CASES))
def test_conv_add_counts_qat(name):
    model, example, _, expected = CASES[name]
    torch.manual_seed(0)
    assert qdq_counts(ours(model(), example, global_only, is_qat=True)) == expected


def test_conv_of_conv_added_in_place_has_one_quantize_more_than_torchao():
    """``tmp += conv2(tmp)``: the add writes into tmp after conv2 read it, so qcore observes tmp
    right before each reader (two quantizes with the same qparams, where torchao has one); the
    dequantizes and the numbers are the same."""
    torch.manual_seed(0)
    converted = ours(ConvOfConvAdded(inplace=True), SMALL, global_only)
    assert qdq_counts(converted) == counts(3, 3, 2)
    (add,) = calls(converted, "add_")
    conv2 = calls(converted, "conv2d")[1]
    assert add.args[0].args[0].args[1:] == conv2.args[0].args[0].args[1:]  # the same scale and zero point


def test_conv_of_conv_added_node_order():
    """x -> q -> dq -> conv -> q -> {dq -> conv2, dq -> add}: the add's accumulator is tmp."""
    torch.manual_seed(0)
    converted = ours(ConvOfConvAdded(), SMALL, global_only)
    first, second = calls(converted, "conv2d")
    (add,) = calls(converted, "add")
    (quantize,) = first.users
    assert op_name(quantize.target) == "quantize_per_tensor"
    dequantizes = list(quantize.users)
    assert len(dequantizes) == 2 and all(is_dequantize(d) for d in dequantizes)
    assert {second.args[0], add.args[0]} == set(dequantizes)
    assert add.args[1] is second  # conv2's output is not quantized: it is the fused conv's float output


def test_serial_chain_node_order():
    """q -> dq -> conv -> q -> dq -> conv2, conv3 -> add -> relu -> q -> dq -> conv4 -> add -> relu."""
    torch.manual_seed(0)
    converted = ours(SerialConvAddReLU(), LARGE, global_only)
    names = [op_name(n.target) for n in converted.graph.nodes if n.op == "call_function"
             and op_name(n.target) in ("quantize_per_tensor", "dequantize_per_tensor", "conv2d", "add", "relu")]
    convs = [i for i, n in enumerate(names) if n == "conv2d"]
    # every conv reads a dequantize; each add has one dequantized input (its accumulator)
    for node in calls(converted, "conv2d"):
        assert is_dequantize(node.args[0])
    for add in calls(converted, "add"):
        assert sum(is_dequantize(a) for a in add.args) == 1
    assert names[:3] == ["quantize_per_tensor", "dequantize_per_tensor", "conv2d"] and len(convs) == 4
    assert names[-2:] == ["add", "relu"]


def test_add_partitions_are_flagged_output_of_quantized_pattern():
    gm = torch.export.export(SerialConvAddReLU().eval(), LARGE).module()
    X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()).annotate(gm)
    flagged = sorted(n.name for n in gm.graph.nodes
                     if getattr(n.meta.get("quantization_annotation"), "_is_output_of_quantized_pattern", False))
    # conv and conv3 alone, conv2 -> add(conv3) -> relu, conv4 -> add(res1) -> relu (torchao flags the same)
    assert flagged == ["conv2d", "conv2d_2", "relu", "relu_1"]
    extra = {n.name: [a.name for a in n.meta["quantization_annotation"].input_qspec_map]
             for n in gm.graph.nodes if n.name in ("add", "add_1")}
    assert extra == {"add": ["conv2d_2"], "add_1": ["relu"]}


@pytest.mark.torchao
@pytest.mark.parametrize("name", STATIC)
def test_conv_add_matches_torchao(name):
    model, example, expected, _ = CASES[name]
    torch.manual_seed(0)
    assert assert_matches_torchao(model(), example, global_only) == expected


@pytest.mark.torchao
@pytest.mark.parametrize("name", [n for n in CASES if "in place" not in n])
def test_conv_add_qat_matches_torchao(name):
    model, example, _, expected = CASES[name]
    torch.manual_seed(0)
    assert assert_matches_torchao(model(), example, global_only, is_qat=True) == expected


@pytest.mark.parametrize("name", ["conv of conv added", "serial conv add relu", "residual"])
def test_lowered_chains_match_the_qdq_program(name):
    model, example, _, _ = CASES[name]
    torch.manual_seed(0)
    converted = convert(model(), example, X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()))
    lowered = qcore.lower(converted, backend="onednn", example_inputs=example)
    assert not calls(lowered, "conv2d")  # every conv runs on oneDNN
    with torch.no_grad():
        diff = float((converted(*example) - lowered(*example)).abs().max())
    assert diff <= largest_step(converted) * 1.01 + 1e-5
    if name == "serial conv add relu":
        # conv2 + conv3: fused (accumulator conv3's uint8 output); conv4 + res1: res1 is conv4's
        # own input, which oneDNN's in-place sum cannot take: a float add of the dequantized res1
        assert lowered.meta["qcore_lowered"]["counters"]["qconv2d_binary_matcher_count"] == 1
        assert len(calls(lowered, "add")) == 1
