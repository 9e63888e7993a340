"""linear and linear -> relu: annotations and q/dq counts after convert for every config kind."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.spec import SharedQuantizationSpec
from _xnnpack_helpers import annotate, annotation, config, input_map, observer_nodes, qdq_counts, quantize, quantizer, quantizer_with


class Linear(torch.nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 5, bias=bias)

    def forward(self, x):
        return self.fc(x)


class LinearReluLinear(torch.nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.inplace = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3), inplace

    def forward(self, x):
        y = self.fc1(x)
        y = torch.relu_(y) if self.inplace else torch.relu(y)
        return self.fc2(y)


X = (torch.randn(2, 4),)


def test_linear_gets_input_weight_bias_and_output_specs():
    cfg = config()
    gm = annotate(Linear(), X, quantizer())
    assert input_map(gm, "linear") == {"x": cfg.input_activation, "fc_weight": cfg.weight, "fc_bias": None}
    assert annotation(gm, "linear").output_qspec is cfg.output_activation
    assert annotation(gm, "fc_weight")._annotated and annotation(gm, "fc_bias")._annotated


def test_linear_without_bias_has_two_inputs():
    gm = annotate(Linear(bias=False), X, quantizer())
    assert list(input_map(gm, "linear")) == ["x", "fc_weight"]


@pytest.mark.parametrize("inplace", [False, True])
def test_linear_relu_puts_the_output_spec_on_the_relu(inplace):
    cfg = config()
    gm = annotate(LinearReluLinear(inplace), X, quantizer())
    relu = next(n for n in gm.graph.nodes if n.op == "call_function" and "relu" in n.name)
    assert input_map(gm, "linear") == {"x": cfg.input_activation, "fc1_weight": cfg.weight, "fc1_bias": None}
    assert annotation(gm, "linear").output_qspec is None  # the later plain-linear annotator did not add one
    assert relu.meta["quantization_annotation"].output_qspec is cfg.output_activation
    assert relu.meta["quantization_annotation"].input_qspec_map == {}


def test_linear_relu_observers_after_prepare():
    prepared = qcore.prepare_pt2e(torch.export.export(LinearReluLinear().eval(), X).module(), quantizer())
    # x, w1, relu output, w2, fc2 output: none between linear and relu
    assert len(observer_nodes(prepared)) == 5
    linear = next(n for n in prepared.graph.nodes if n.name == "linear")
    assert [u.name for u in linear.users] == ["relu"]


def test_linear_with_a_second_user_is_not_fused_with_relu():
    class TwoUsers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) + y

    cfg = config()
    gm = annotate(TwoUsers(), X, quantizer())
    linear = next(n for n in gm.graph.nodes if n.name == "linear")
    assert annotation(gm, "linear").output_qspec is cfg.output_activation
    # not fused: the standalone relu shares the linear's observer (ExecuTorch 1.5.1's propagation list)
    assert annotation(gm, "relu").output_qspec == SharedQuantizationSpec(linear)


EXPECTED_COUNTS = {
    # x, relu output, fc2 output are q/dq'ed; the two weights are folded to int8 (dq only)
    "static": {"q": 3, "dq": 5},
    "per_channel": {"q": 3, "dq": 3, "dq_pc": 2},
    # dynamic: the two activations are quantized at run time, no output quantization
    "dynamic": {"choose_qparams": 2, "q": 2, "dq": 4},
    "qat": {"q": 3, "dq": 5},
}


@pytest.mark.parametrize("kind", list(EXPECTED_COUNTS))
def test_linear_relu_linear_qdq_counts(kind):
    converted = quantize(LinearReluLinear(), X, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == EXPECTED_COUNTS[kind]
    assert converted(*X).shape == (2, 3)


def test_dynamic_config_annotates_only_linear():
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.conv(x) + 1.0)

    gm = annotate(Mixed(), (torch.randn(1, 3, 4, 4),), quantizer("dynamic"))
    annotated = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("quantization_annotation")}
    assert annotated == {"linear"}
    assert annotation(gm, "linear").output_qspec is None
    assert input_map(gm, "linear")["add"].is_dynamic


def test_dynamic_qat_config_annotates_only_linear():
    class ConvLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)))

    q = quantizer_with(is_qat=True, is_dynamic=True)
    gm = annotate(ConvLinear(), (torch.randn(1, 3, 4, 4),), q, train=True)
    annotated = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.meta.get("quantization_annotation")}
    assert annotated == {"linear"}


def test_two_dynamic_linears_on_one_input_share_one_activation_observer():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    prepared = qcore.prepare_pt2e(torch.export.export(TwoHeads().eval(), X).module(), quantizer("dynamic"))
    x = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    act_observers = [u for u in x.users if u.op == "call_module" and u.meta.get("qcore_observer")]
    assert len(act_observers) == 1
    assert len(observer_nodes(prepared)) == 3  # one activation + two weights, no outputs
