"""max_pool2d, adaptive_avg_pool2d and cat: outputs share their inputs' observers."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.spec import SharedQuantizationSpec
from _xnnpack_helpers import annotate, annotation, config, export, input_map, observer_nodes, qdq_counts, quantize, quantizer

X = (torch.randn(1, 3, 8, 8),)


def _observer_after(prepared, name):
    """The observer module right after node ``name`` (its output observer)."""
    node = next(n for n in prepared.graph.nodes if n.name == name)
    users = [u for u in node.users if u.op == "call_module" and u.meta.get("qcore_observer")]
    assert len(users) == 1, f"{name} has {len(users)} output observers"
    return prepared.get_submodule(users[0].target)


class ConvReluMaxPool(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)


def test_max_pool2d_shares_the_relu_observer():
    gm = annotate(ConvReluMaxPool(), X, quantizer())
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert annotation(gm, "max_pool2d").output_qspec == SharedQuantizationSpec(relu)
    prepared = qcore.prepare_pt2e(export(ConvReluMaxPool(), *X), quantizer())
    assert _observer_after(prepared, "max_pool2d") is _observer_after(prepared, "relu")
    assert qdq_counts(quantize(ConvReluMaxPool(), X, quantizer())) == {"q": 3, "dq": 4}


def test_max_pool2d_after_an_unquantized_producer_stays_float():
    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.max_pool2d(torch.sigmoid(x), 2)

    gm = annotate(Pool(), X, quantizer())
    assert annotation(gm, "max_pool2d") is None


def test_adaptive_avg_pool2d_shares_the_conv_observer():
    class ConvPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)

    gm = annotate(ConvPool(), X, quantizer())
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    pool = next(n for n in gm.graph.nodes if n.name == "adaptive_avg_pool2d")
    assert input_map(gm, "adaptive_avg_pool2d") == {"conv2d": SharedQuantizationSpec(conv)}
    assert annotation(gm, "adaptive_avg_pool2d").output_qspec == SharedQuantizationSpec((conv, pool))
    prepared = qcore.prepare_pt2e(export(ConvPool(), *X), quantizer())
    assert _observer_after(prepared, "adaptive_avg_pool2d") is _observer_after(prepared, "conv2d")


def test_adaptive_avg_pool2d_after_an_unquantized_producer_gets_its_own_observer():
    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(torch.sigmoid(x), 1)

    gm = annotate(Pool(), X, quantizer())
    assert input_map(gm, "adaptive_avg_pool2d") == {"sigmoid": config().input_activation}
    prepared = qcore.prepare_pt2e(export(Pool(), *X), quantizer())
    assert len(observer_nodes(prepared)) == 2  # input edge and output, one shared instance
    a, b = (prepared.get_submodule(n.target) for n in observer_nodes(prepared))
    assert a is b


class ThreeConvCat(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Conv2d(3, 2, 1) for _ in range(3))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], 1)


def test_cat_inputs_share_the_first_input_edge():
    cfg = config()
    gm = annotate(ThreeConvCat(), X, quantizer())
    cat = next(n for n in gm.graph.nodes if n.name == "cat")
    first = cat.args[0][0]
    shared = SharedQuantizationSpec((first, cat))
    assert input_map(gm, "cat") == {"conv2d": cfg.input_activation, "conv2d_1": shared, "conv2d_2": shared}
    assert annotation(gm, "cat").output_qspec == shared


def test_cat_uses_one_observer_for_its_producers_and_its_output():
    prepared = qcore.prepare_pt2e(export(ThreeConvCat(), *X), quantizer())
    instances = {id(_observer_after(prepared, name)) for name in ("conv2d", "conv2d_1", "conv2d_2", "cat")}
    assert len(instances) == 1
    cat = next(n for n in prepared.graph.nodes if n.name == "cat")
    # each cat input is the producer's output observer, no extra observer per edge
    assert all(arg.args[0].name.startswith("conv2d") for arg in cat.args[0])
    # x: one q, a dq per conv; three weights (dq only); each conv output and the cat output
    # get a q/dq pair, all with the same scale and zero point
    converted = quantize(ThreeConvCat(), X, quantizer())
    assert qdq_counts(converted) == {"q": 5, "dq": 10}
    cat = next(n for n in converted.graph.nodes if n.name == "cat")
    scales = {(dq.args[1], dq.args[2]) for dq in cat.args[0]}
    assert len(scales) == 1


def test_cat_with_a_repeated_first_input_keeps_its_first_spec():
    class Repeat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.cat([y, y, x], 1)

    cfg = config()
    gm = annotate(Repeat(), X, quantizer())
    inputs = input_map(gm, "cat")
    assert inputs["conv2d"] is cfg.input_activation
    assert isinstance(inputs["x"], SharedQuantizationSpec)
    converted = quantize(Repeat(), X, quantizer())  # the seed recursed forever here
    assert converted(*X).shape == (1, 7, 8, 8)


def test_cat_of_integer_tensors_stays_float():
    class IntCat(torch.nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b])

    gm = annotate(IntCat(), (torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)), quantizer())
    assert annotation(gm, "cat") is None


@pytest.mark.parametrize("kind", ["per_channel", "qat"])
def test_cat_counts_for_other_configs(kind):
    counts = qdq_counts(quantize(ThreeConvCat(), X, quantizer(kind), is_qat=kind == "qat"))
    if kind == "per_channel":
        assert counts == {"q": 5, "dq": 7, "dq_pc": 3}
    else:
        assert counts == {"q": 5, "dq": 10}


class ConvAvgPool(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)


POOL_COUNTS = {
    # conv input, weight (dq only), conv/relu output, pool output (same scale)
    "static": {"q": 3, "dq": 4},
    "per_channel": {"q": 3, "dq": 3, "dq_pc": 1},
    "dynamic": {},
    "qat": {"q": 3, "dq": 4},
}


@pytest.mark.parametrize("kind", list(POOL_COUNTS))
@pytest.mark.parametrize("model_cls", [ConvReluMaxPool, ConvAvgPool])
@pytest.mark.filterwarnings("ignore:XNNPACKQuantizer annotated none")
def test_pool_counts_for_every_config_kind(model_cls, kind):
    converted = quantize(model_cls(), X, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == POOL_COUNTS[kind]
