"""gru_io_only and propagate_annotation."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.spec import SharedQuantizationSpec
from _xnnpack_helpers import annotate, annotation, config, export, input_map, observer_nodes, qdq_counts, quantize, quantizer


class GRUModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(4, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x, h):
        y, h_n = self.gru(x, h)
        return self.fc(y), h_n


GRU_INPUTS = (torch.randn(5, 2, 4), torch.randn(1, 2, 8))


@pytest.mark.filterwarnings("ignore:The tensor attributes self.gru")
def test_gru_input_hidden_state_and_both_results_are_annotated():
    cfg = config()
    gm = annotate(GRUModel(), GRU_INPUTS, quantizer())
    assert input_map(gm, "gru") == {"x": cfg.input_activation, "h": cfg.input_activation}
    assert annotation(gm, "getitem").output_qspec is cfg.output_activation
    assert annotation(gm, "getitem_1").output_qspec is cfg.output_activation
    assert not any(annotation(gm, n.name) and annotation(gm, n.name).input_qspec_map for n in gm.graph.nodes if n.op == "get_attr")


@pytest.mark.filterwarnings("ignore:The tensor attributes self.gru")
def test_gru_qdq_counts():
    converted = quantize(GRUModel(), GRU_INPUTS, quantizer())
    # x, h, y (also the linear's input), h_n, linear weight (dq only), linear output
    assert qdq_counts(converted) == {"q": 5, "dq": 6}
    y, h_n = converted(*GRU_INPUTS)
    assert y.shape == (5, 2, 3) and h_n.shape == (1, 2, 8)


class ConvChain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y.view(1, 4, -1).permute(0, 2, 1).flatten(1)


X = (torch.randn(1, 3, 4, 4),)


def test_propagation_along_view_permute_flatten():
    gm = annotate(ConvChain(), X, quantizer())
    previous = "conv2d"
    for name in ("view", "permute", "flatten"):
        prev = next(n for n in gm.graph.nodes if n.name == previous)
        assert input_map(gm, name) == {previous: SharedQuantizationSpec(prev)}
        assert annotation(gm, name).output_qspec == SharedQuantizationSpec(prev)
        previous = name
    prepared = qcore.prepare_pt2e(export(ConvChain(), *X), quantizer())
    outputs = [n for n in observer_nodes(prepared) if n.args[0].op == "call_function"]
    assert len({id(prepared.get_submodule(n.target)) for n in outputs}) == 1


class ExecuTorchShareList(torch.nn.Module):
    """Each op ExecuTorch 1.5.1 added to the older sharing list, after one conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        pooled = torch.nn.functional.max_pool2d(torch.relu(y.transpose(2, 3)), 2)
        return y[:, :4], pooled.reshape(1, -1)


def test_relu_transpose_slice_reshape_and_max_pool_share_their_producer():
    # ExecuTorch 1.5.1's list: relu, max_pool2d, transpose.int, reshape, slice.Tensor, dropout
    gm = annotate(ExecuTorchShareList(), X, quantizer())
    chain = {"slice_1": "conv2d", "transpose": "conv2d", "relu": "transpose", "max_pool2d": "relu", "reshape": "max_pool2d"}
    for name, producer in chain.items():
        prev = next(n for n in gm.graph.nodes if n.name == producer)
        assert input_map(gm, name) == {producer: SharedQuantizationSpec(prev)}, name
        assert annotation(gm, name).output_qspec == SharedQuantizationSpec(prev), name
    prepared = qcore.prepare_pt2e(export(ExecuTorchShareList(), *X), quantizer())
    outputs = [n for n in observer_nodes(prepared) if n.args[0].op == "call_function"]
    assert len({id(prepared.get_submodule(n.target)) for n in outputs}) == 1


def test_dropout_in_a_training_graph_shares_its_producer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Dropout(0.5)).train()
    gm = annotate(model, X, quantizer(), train=True)
    dropout = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.dropout.default)
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert annotation(gm, dropout.name).output_qspec == SharedQuantizationSpec(conv)


def test_an_unquantized_producer_propagates_nothing():
    class FloatThenTranspose(torch.nn.Module):
        def forward(self, x):
            return torch.sin(x).transpose(2, 3).relu()

    gm = annotate(FloatThenTranspose(), X, quantizer())
    assert annotation(gm, "transpose") is None and annotation(gm, "relu") is None


def test_propagation_never_overwrites_a_claimed_node():
    class AvgAfterConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)

    gm = annotate(AvgAfterConv(), X, quantizer())
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    pool = next(n for n in gm.graph.nodes if n.name == "adaptive_avg_pool2d")
    # adaptive_avg_pool2d is in the propagation list, but its own annotator claimed it first
    assert annotation(gm, "adaptive_avg_pool2d").output_qspec == SharedQuantizationSpec((conv, pool))


def test_propagated_chain_counts():
    # x, weight (dq only), conv output, then one q/dq pair per propagated op
    assert qdq_counts(quantize(ConvChain(), X, quantizer())) == {"q": 5, "dq": 6}


GRU_COUNTS = {
    "static": {"q": 5, "dq": 6},
    "per_channel": {"q": 5, "dq": 5, "dq_pc": 1},
    "dynamic": {"choose_qparams": 1, "q": 1, "dq": 2},  # only the linear after the GRU
    "qat": {"q": 5, "dq": 6},
}
CHAIN_COUNTS = {
    "static": {"q": 5, "dq": 6},
    "per_channel": {"q": 5, "dq": 5, "dq_pc": 1},
    "dynamic": {},
    "qat": {"q": 5, "dq": 6},
}


@pytest.mark.parametrize("kind", list(GRU_COUNTS))
@pytest.mark.filterwarnings("ignore:The tensor attributes self.gru")
def test_gru_counts_for_every_config_kind(kind):
    converted = quantize(GRUModel(), GRU_INPUTS, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == GRU_COUNTS[kind]


@pytest.mark.parametrize("kind", list(CHAIN_COUNTS))
@pytest.mark.filterwarnings("ignore:XNNPACKQuantizer annotated none")
def test_propagated_chain_counts_for_every_config_kind(kind):
    converted = quantize(ConvChain(), X, quantizer(kind), is_qat=kind == "qat")
    assert qdq_counts(converted) == CHAIN_COUNTS[kind]
