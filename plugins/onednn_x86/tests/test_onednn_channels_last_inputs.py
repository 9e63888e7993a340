"""A conv input quantized from float is made channels-last right after its quantize (the
layout oneDNN's conv reads), and qcore_onednn.qconv2d_add stays a cheap functional op."""

from __future__ import annotations

import torch

import qcore_onednn_x86.lowering.custom_ops  # noqa: F401  (registers qcore_onednn.qconv2d_add)

from _onednn_helpers import aten, assert_close_to_reference, calls, counters, lower, onednn, qd, quantize, skip_range_clamp

QCONV_ADD = torch.ops.qcore_onednn.qconv2d_add.default


class TwoHeads(torch.nn.Module):
    """The input feeds two convs; a third conv reads a oneDNN output; then a linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 1)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c(torch.relu(self.a(x)))) + self.b(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def channels_last_calls(lowered):
    return [n for n in calls(lowered, aten.contiguous.default) if n.kwargs.get("memory_format") is torch.channels_last]


def test_the_input_quantize_is_made_channels_last_once_for_every_conv_that_reads_it():
    example = (torch.randn(2, 3, 8, 8),)
    converted = quantize(TwoHeads(), example)
    lowered = lower(converted, example)
    (channels_last,) = channels_last_calls(lowered)
    assert channels_last.args[0].target is qd.quantize_per_tensor.default
    readers = {user.target for user in channels_last.users}
    assert readers <= {onednn.qconv2d_pointwise.default, QCONV_ADD} and len(channels_last.users) == 2
    # the conv fed by another oneDNN conv reads that output directly
    inner = [n for n in calls(lowered, onednn.qconv2d_pointwise.default, QCONV_ADD) if n not in channels_last.users]
    assert inner and all(skip_range_clamp(n.args[0]).target in (onednn.qconv2d_pointwise.default, QCONV_ADD) for n in inner)
    assert counters(lowered)["qconv2d_channels_last_input_matcher_count"] == 1
    assert_close_to_reference(converted, lowered, example)
    with torch.no_grad():
        assert first_conv_input_is_channels_last_at_run_time(lowered, example)


def first_conv_input_is_channels_last_at_run_time(lowered, example) -> bool:
    """The tensor the first conv gets is channels-last when the lowered model runs."""
    seen = []
    graph_conv = channels_last_calls(lowered)[0]
    interpreter = torch.fx.Interpreter(lowered)
    original = interpreter.run_node

    def run_node(node):
        result = original(node)
        if node is graph_conv:
            seen.append(result.is_contiguous(memory_format=torch.channels_last))
        return result

    interpreter.run_node = run_node
    interpreter.run(*example)
    return seen == [True]


def test_a_linear_only_model_gets_no_layout_change():
    example = (torch.randn(4, 16),)
    converted = quantize(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)), example)
    lowered = lower(converted, example)
    assert channels_last_calls(lowered) == []
    assert "qconv2d_channels_last_input_matcher_count" not in counters(lowered)


def test_qconv2d_add_equals_oneDNN_binary_conv_on_a_copy_and_has_no_autograd_wrapper():
    """The functional wrapper is a plain library op: oneDNN's in-place "sum" conv on a private
    copy, the caller's accumulator untouched, and no Python autograd layer in front of it (the
    ``custom_op`` wrapper it replaced cost about 25 us a call)."""
    torch.manual_seed(0)
    x = torch.randint(0, 255, (1, 8, 4, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    accum = torch.randint(0, 255, (1, 8, 4, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    w_scale, w_zp, bias = torch.rand(8) * 0.01, torch.zeros(8, dtype=torch.int64), torch.randn(8)
    packed = onednn.qconv_prepack(torch.randint(-127, 127, (8, 8, 1, 1), dtype=torch.int8), w_scale, 0.03, 128,
                                  [1, 1], [0, 0], [1, 1], 1, [1, 8, 4, 4])
    common = (x, 0.03, 128, packed, w_scale, w_zp)
    conv = ([1, 1], [0, 0], [1, 1], 1, 0.02, 0, torch.uint8, 0.02, 0)
    before = accum.clone()
    with torch.no_grad():
        wrapped = QCONV_ADD(*common, accum, bias, *conv, "relu")
        assert torch.equal(accum, before)
        raw = onednn.qconv2d_pointwise.binary(*common, accum.clone(), bias, *conv, "sum", 1.0, "relu", [], "")
    assert torch.equal(wrapped, raw)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("qcore_onednn::qconv2d_add", "AutogradCPU")
