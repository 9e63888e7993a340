"""add / mul (alone and followed by relu): annotations, skip rules, q/dq counts."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.spec import SharedQuantizationSpec
from _xnnpack_helpers import annotate, annotation, config, export, input_map, observer_nodes, qdq_counts, quantize, quantizer

AB = (torch.randn(2, 4), torch.randn(2, 4))


class Binary(torch.nn.Module):
    def __init__(self, op: str, relu: bool = False) -> None:
        super().__init__()
        self.op, self.relu = op, relu

    def forward(self, a, b):
        y = a + b if self.op == "add" else a * b
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary_op_gets_both_inputs_and_output(op):
    cfg = config()
    gm = annotate(Binary(op), AB, quantizer())
    assert input_map(gm, op) == {"a": cfg.input_activation, "b": cfg.input_activation}
    assert annotation(gm, op).output_qspec is cfg.output_activation


@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary_relu_has_no_observer_between_op_and_relu(op):
    cfg = config()
    gm = annotate(Binary(op, relu=True), AB, quantizer())
    assert annotation(gm, op).output_qspec is None
    assert set(input_map(gm, op)) == {"a", "b"}
    assert annotation(gm, "relu").output_qspec is cfg.output_activation
    prepared = qcore.prepare_pt2e(export(Binary(op, relu=True), *AB), quantizer())
    assert len(observer_nodes(prepared)) == 3


def test_scalar_operand_is_observed_after_transform():
    class AddOne(torch.nn.Module):
        def forward(self, x):
            return x + 1.0

    gm = annotate(AddOne(), (torch.randn(2, 4),), quantizer())
    assert set(input_map(gm, "add")) == {"x", "_tensor_constant_0"}
    converted = quantize(AddOne(), (torch.randn(2, 4),), quantizer())
    # x, the constant (folded: dq only) and the output
    assert qdq_counts(converted) == {"q": 2, "dq": 3}


def test_large_scalar_operand_keeps_the_add_float():
    class AddHuge(torch.nn.Module):
        def forward(self, x):
            return x + 1e16

    gm = annotate(AddHuge(), (torch.randn(2, 4),), quantizer())
    assert annotation(gm, "add") is None


def test_large_scalar_in_a_submodule_buffer_keeps_the_add_float():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("big", torch.tensor(-4e15))

    class AddBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.holder = Holder()

        def forward(self, x):
            return x + self.holder.big

    gm = annotate(AddBuffer(), (torch.randn(2, 4),), quantizer())
    assert annotation(gm, "add") is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.bfloat16])
def test_non_float32_operand_keeps_the_op_float(dtype):
    class AddTyped(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    gm = annotate(AddTyped(), (torch.ones(2, 4, dtype=dtype), torch.ones(2, 4, dtype=dtype)), quantizer())
    assert annotation(gm, "add") is None


def test_add_with_a_second_user_is_not_fused_with_relu():
    class TwoUsers(torch.nn.Module):
        def forward(self, a, b):
            y = a + b
            return torch.relu(y), y

    gm = annotate(TwoUsers(), AB, quantizer())
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert annotation(gm, "add").output_qspec is config().output_activation
    # not fused: the standalone relu shares the add's observer (ExecuTorch 1.5.1's propagation list)
    assert annotation(gm, "relu").output_qspec == SharedQuantizationSpec(add)


EXPECTED_COUNTS = {
    # a, b, output
    ("add", False): {"q": 3, "dq": 3},
    ("add", True): {"q": 3, "dq": 3},
    ("mul", False): {"q": 3, "dq": 3},
    ("mul", True): {"q": 3, "dq": 3},
}


@pytest.mark.parametrize("op,relu", list(EXPECTED_COUNTS))
@pytest.mark.parametrize("kind", ["static", "per_channel", "qat"])
def test_binary_qdq_counts(op, relu, kind):
    converted = quantize(Binary(op, relu), AB, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == EXPECTED_COUNTS[(op, relu)]


def test_dynamic_config_leaves_binary_ops_float():
    with pytest.warns(UserWarning, match="annotated none"):
        converted = quantize(Binary("add"), AB, quantizer("dynamic"))
    assert qdq_counts(converted) == {}
