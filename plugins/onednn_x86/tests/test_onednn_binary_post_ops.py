"""Binary (add / add + relu) post-op fusion into oneDNN conv / linear.

Conv + add lowers to ``qcore_onednn.qconv2d_add``: oneDNN's ``qconv2d_pointwise.binary`` "sum"
on a private copy of the accumulator (a functional op, so the graph compiles)."""

from __future__ import annotations

import pytest
import torch

import qcore_onednn_x86.lowering.custom_ops  # noqa: F401

from _onednn_helpers import aten, assert_close_to_reference, calls, count, counters, lower, onednn, qd, quantize

QCONV_ADD = torch.ops.qcore_onednn.qconv2d_add.default


class ResidualBlock(torch.nn.Module):
    """conv-relu, conv, + identity, relu; then a conv reads the block output (quantize)."""

    def __init__(self, relu=True, tail=True):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.tail = torch.nn.Conv2d(8, 4, 1) if tail else None
        self.relu = relu

    def forward(self, x):
        identity = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(identity))) + identity
        if self.relu:
            y = torch.relu(y)
        return self.tail(y) if self.tail is not None else y


@pytest.mark.parametrize("relu", [True, False])
def test_conv_add_relu_quantize_becomes_one_binary_conv(relu):
    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ResidualBlock(relu=relu), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, QCONV_ADD)
    assert binary.args[14] == torch.uint8
    assert binary.args[17] == ("relu" if relu else "none")
    accum_dq = calls(converted, aten.add.Tensor)[0].args[1]
    assert binary.args[15:17] == (accum_dq.args[1], accum_dq.args[2])
    assert count(lowered, aten.add.Tensor, aten.relu.default) == 0
    assert counters(lowered)["qconv2d_binary_matcher_count"] == 1
    assert count(lowered, qd.quantize_per_tensor.default) == 1
    assert_close_to_reference(converted, lowered, example)


def test_conv_add_relu_with_float_output():
    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ResidualBlock(relu=True, tail=False), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, QCONV_ADD)
    assert binary.args[12:18] == (1.0, 0, torch.float32, 1.0, 0, "relu")
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


class ResidualKeepsIdentity(ResidualBlock):
    """Another conv reads the block's (quantized) identity after the add."""

    def __init__(self):
        super().__init__()
        self.after = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        identity = torch.relu(self.stem(x))
        y = torch.relu(self.conv2(torch.relu(self.conv1(identity))) + identity)
        return self.tail(y), self.after(identity)


def test_binary_conv_accumulates_in_place_only_when_nothing_reads_the_accumulator_afterwards():
    example = (torch.randn(2, 3, 10, 10),)
    converted = quantize(ResidualBlock(), example)
    (binary,) = calls(lower(converted, example), QCONV_ADD)
    assert binary.args[18] is True  # the identity's other reader (conv1) ran before

    converted = quantize(ResidualKeepsIdentity(), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, QCONV_ADD)
    assert binary.args[18] is False
    with torch.no_grad():
        (ref_out, ref_after), (out, after) = converted(*example), lowered(*example)
    step = max(float(n.args[1]) for n in calls(converted, qd.quantize_per_tensor.default)) * 1.01 + 1e-5
    assert (ref_after - after).abs().max() <= step  # the later conv still reads the identity, not the sum
    assert (ref_out - out).abs().max() <= step


@pytest.mark.slow
def test_in_place_binary_conv_compiles_to_the_same_result():
    import qcore

    torch._dynamo.reset()
    example = (torch.randn(2, 3, 10, 10),)
    for model in (ResidualBlock(), ResidualKeepsIdentity()):
        compiled = qcore.compile(quantize(model, example), backend="onednn", example_inputs=example)
        with torch.no_grad():
            expected = compiled.lowered(*example)
        for _ in range(2):
            actual = compiled(*example)
            for e, a in zip(torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(actual)):
                assert (e - a).abs().max() < 1e-4
    torch._dynamo.reset()


def test_conv_add_with_its_own_input_is_not_fused():
    class SelfAdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            return self.conv(y) + y

    example = (torch.randn(1, 3, 8, 8),)
    converted = quantize(SelfAdd(), example)
    lowered = lower(converted, example)
    assert count(lowered, QCONV_ADD) == 0
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


def test_broadcasting_add_is_not_fused():
    class BiasAdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("row", torch.randn(8))

        def forward(self, x):
            return self.fc(x) + self.row

    example = (torch.randn(4, 8),)
    converted = quantize(BiasAdd(), example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qlinear_pointwise.binary) == 0
    assert count(lowered, onednn.qlinear_pointwise.default) == 1


class LinearResidual(torch.nn.Module):
    def __init__(self, swap=False, relu=False, tail=False):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.fc_tail = torch.nn.Linear(16, 4) if tail else None
        self.swap, self.relu = swap, relu

    def forward(self, x, other):
        y = torch.relu(other)  # a fresh tensor (Inductor cannot drop relu as a no-op)
        y = y + self.fc(x) if self.swap else self.fc(x) + y
        if self.relu:
            y = torch.relu(y)
        return self.fc_tail(y) if self.fc_tail is not None else y


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_add_float_output_sums_in_place(swap, relu):
    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(LinearResidual(swap=swap, relu=relu), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[10:16] == (torch.float32, 1.0, 0, "sum", 1.0, "relu" if relu else "none")
    assert counters(lowered)["qlinear_binary_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


def test_linear_add_with_a_shared_extra_input_adds_out_of_place():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x, other):
            y = other * 1.0
            return self.fc(x) + y, y

    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(Shared(), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "add"
    for r, a in zip(converted(*example), lowered(*example)):
        assert (r - a).abs().max() < 1e-4


class FeedForwardResidual(torch.nn.Module):
    """A transformer FFN: the layer-norm output feeds the FFN (through its quantize) and the
    residual add after it; ``read_after`` also reads it once the add has run."""

    def __init__(self, read_after=False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.read_after = read_after

    def forward(self, x):
        y = self.norm(x)
        z = self.fc2(torch.relu(self.fc1(y))) + y
        return z * y if self.read_after else z


def test_linear_add_sums_into_an_extra_input_whose_other_readers_ran_before():
    example = (torch.randn(2, 4, 16),)
    converted = quantize(FeedForwardResidual(), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "sum" and len(binary.args[6].users) == 2
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


def test_linear_add_is_not_summed_in_place_when_the_extra_input_is_read_afterwards():
    example = (torch.randn(2, 4, 16),)
    converted = quantize(FeedForwardResidual(read_after=True), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "add"
    assert_close_to_reference(converted, lowered, example, atol=1e-3)


def test_linear_add_does_not_sum_into_a_tensor_inductor_may_drop_as_a_no_op():
    class TimesOne(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x, other):
            return self.fc(x) + other * 1.0  # compiled, "other * 1.0" is "other", the caller's

    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(TimesOne(), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "add"
    assert_close_to_reference(converted, lowered, example, atol=1e-4)


class AttentionOutputResidual(torch.nn.Module):
    """out_proj(x) + x, the extra input a graph input, then a layer norm."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.fc(x) + x)


@pytest.mark.slow
def test_compiled_linear_add_on_a_graph_input_leaves_the_input_alone():
    import qcore

    torch._dynamo.reset()
    example = (torch.randn(2, 4, 16),)
    converted = quantize(AttentionOutputResidual(), example)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=example)
    (binary,) = calls(compiled.lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "add"  # never "sum" into the caller's tensor
    x = example[0].clone()
    with torch.no_grad():
        expected = compiled.lowered(x)
    for _ in range(2):
        assert (compiled(x) - expected).abs().max() < 1e-4
    assert torch.equal(x, example[0])
    torch._dynamo.reset()


def test_linear_add_relu_with_a_shared_extra_input_adds_out_of_place():
    class SharedRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x, other):
            y = other * 1.0
            return torch.relu(self.fc(x) + y), y

    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(SharedRelu(), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[13] == "add" and binary.args[15] == "relu"
    for r, a in zip(converted(*example), lowered(*example)):
        assert (r - a).abs().max() < 1e-4


@pytest.mark.slow
def test_in_place_linear_sum_compiles_to_the_same_result():
    import qcore

    torch._dynamo.reset()
    example = (torch.randn(2, 4, 16),)
    converted = quantize(FeedForwardResidual(), example)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=example)
    assert calls(compiled.lowered, onednn.qlinear_pointwise.binary)[0].args[13] == "sum"
    x = example[0].clone()
    with torch.no_grad():
        expected = compiled.lowered(*example)
    for _ in range(2):
        assert (compiled(x) - expected).abs().max() < 1e-4
    assert torch.equal(x, example[0])
    torch._dynamo.reset()


def test_linear_add_quantize_uses_add_with_uint8_output():
    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(LinearResidual(relu=True, tail=True), example)
    lowered = lower(converted, example)
    (binary,) = calls(lowered, onednn.qlinear_pointwise.binary)
    assert binary.args[10] == torch.uint8 and binary.args[13] == "add" and binary.args[15] == "relu"
    assert_close_to_reference(converted, lowered, example)
