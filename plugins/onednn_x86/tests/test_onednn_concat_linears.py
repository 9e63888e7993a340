"""Linears reading the same quantized activation (q, k, v projections) become one wider oneDNN
linear whose output is split into column views."""

from __future__ import annotations

import torch

from _onednn_helpers import aten, calls, count, counters, lower, onednn, quantize


class QKV(torch.nn.Module):
    def __init__(self, relu_on_v=False):
        super().__init__()
        self.q, self.k, self.v = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)
        self.relu_on_v = relu_on_v

    def forward(self, x):
        v = torch.relu(self.v(x)) if self.relu_on_v else self.v(x)
        return self.q(x).reshape(2, 4, 2, 4), self.k(x) * 2.0, v


def test_three_projections_of_one_input_become_one_linear_split_in_three():
    example = (torch.randn(2, 4, 16),)
    converted = quantize(QKV(), example)
    lowered = lower(converted, example)
    (qlinear,) = calls(lowered, onednn.qlinear_pointwise.default)
    (split,) = calls(lowered, aten.split_with_sizes.default)
    assert split.args[0] is qlinear and list(split.args[1]) == [4, 8, 8]  # v, q, k: graph order
    assert counters(lowered)["qlinear_concat_matcher_count"] == 1
    assert counters(lowered)["qlinear_concat_matcher_nodes"] == 3
    with torch.no_grad():
        for reference, actual in zip(converted(*example), lowered(*example)):
            assert reference.shape == actual.shape
            assert (reference - actual).abs().max() < 1e-4


def test_a_linear_whose_activation_would_fuse_is_left_out():
    example = (torch.randn(2, 4, 16),)
    converted = quantize(QKV(relu_on_v=True), example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qlinear_pointwise.default) == 2  # q+k together, v with its relu
    assert len([n for n in calls(lowered, onednn.qlinear_pointwise.default) if n.args[10] == "relu"]) == 1
    assert counters(lowered)["qlinear_concat_matcher_nodes"] == 2
    with torch.no_grad():
        for reference, actual in zip(converted(*example), lowered(*example)):
            assert (reference - actual).abs().max() < 1e-4


def test_linears_on_different_inputs_stay_separate():
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

        def forward(self, x, y):
            return self.a(x) + 0.0, self.b(y) * 1.0

    example = (torch.randn(4, 16), torch.randn(4, 16))
    converted = quantize(TwoInputs(), example)
    lowered = lower(converted, example)
    assert count(lowered, onednn.qlinear_pointwise.default) == 2
    assert "qlinear_concat_matcher_count" not in counters(lowered)
    with torch.no_grad():
        for reference, actual in zip(converted(*example), lowered(*example)):
            assert (reference - actual).abs().max() < 1e-4
