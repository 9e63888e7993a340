"""Switching an exported graph between training and inference (``qcore/passes/train_eval.py``,
``qcore.move_exported_model_to_eval`` / ``_train``)."""

from __future__ import annotations

import copy

import torch

import qcore
from qcore.passes.train_eval import set_training_mode

aten = torch.ops.aten


class BnDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(4, eps=1e-3, momentum=0.3)
        self.dropout = torch.nn.Dropout(0.4)
        self.feature_dropout = torch.nn.Dropout2d(0.2)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_dropout(self.dropout(self.bn(x)).unsqueeze(-1))


def _calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def _export(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(copy.deepcopy(model), (x,)).module()


def test_eval_flips_only_the_mode_literals():
    x = torch.randn(8, 4, 5)
    gm = _export(BnDropout().train(), x)
    assert gm.training
    assert qcore.move_exported_model_to_eval(gm) is gm
    assert not gm.training
    (bn,) = _calls(gm, aten.batch_norm.default)
    assert bn.args[5:] == (False, 0.3, 1e-3, False)  # training off; momentum and eps are the user's
    (dropout,) = _calls(gm, aten.dropout.default)
    assert dropout.args[1:] == (0.4, False)
    (feature_dropout,) = _calls(gm, aten.feature_dropout.default)
    assert feature_dropout.args[1:] == (0.2, False)


def test_eval_graph_computes_what_the_eager_eval_model_computes():
    model = BnDropout()
    x = torch.randn(8, 4, 5)
    gm = qcore.move_exported_model_to_eval(_export(model.train(), x))
    expected = copy.deepcopy(model).eval()(x)
    torch.testing.assert_close(gm(x), expected)
    torch.testing.assert_close(gm(x), expected)  # deterministic: dropout is off
    torch.testing.assert_close(gm.bn.running_mean, model.bn.running_mean)  # statistics frozen


def test_train_graph_computes_what_the_eager_train_model_computes():
    model = BnDropout()
    x = torch.randn(8, 4, 5)
    gm = qcore.move_exported_model_to_train(_export(model.eval(), x))
    assert gm.training
    (bn,) = _calls(gm, aten.batch_norm.default)
    assert bn.args[5:] == (True, 0.3, 1e-3, False)
    eager = copy.deepcopy(model).train()
    torch.manual_seed(0)
    got = gm(x)
    torch.manual_seed(0)
    expected = eager(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(gm.bn.running_mean, eager.bn.running_mean)  # momentum 0.3 applied
    torch.testing.assert_close(gm.bn.running_var, eager.bn.running_var)


def test_round_trip_and_honest_changed_result():
    x = torch.randn(8, 4, 5)
    gm = _export(BnDropout().train(), x)
    assert set_training_mode(gm, True) is False  # already training: nothing to change
    assert set_training_mode(gm, False) is True
    assert set_training_mode(gm, False) is False
    assert set_training_mode(gm, True) is True
    (bn,) = _calls(gm, aten.batch_norm.default)
    assert bn.args[5:] == (True, 0.3, 1e-3, False)


def test_mode_given_as_keyword_is_flipped_too():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    mean = graph.placeholder("mean")
    var = graph.placeholder("var")
    bn = graph.call_function(
        aten.batch_norm.default,
        (x, None, None, mean, var),
        {"training": True, "momentum": 0.2, "eps": 1e-4, "cudnn_enabled": False},
    )
    out = graph.call_function(aten.dropout.default, (bn,), {"p": 0.5, "train": True})
    graph.output(out)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert set_training_mode(gm, False)
    assert bn.kwargs == {"training": False, "momentum": 0.2, "eps": 1e-4, "cudnn_enabled": False}
    assert out.kwargs == {"p": 0.5, "train": False}
    inputs = torch.randn(3, 2), torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(gm(*inputs), inputs[0] / (1 + 1e-4) ** 0.5)


def test_graph_without_mode_ops_is_unchanged_but_module_flag_follows():
    gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
    code = gm.code
    assert set_training_mode(gm, False) is False
    assert gm.code == code
    assert not gm.training


def test_batch_counter_counts_only_in_training_like_eager():
    x = torch.randn(8, 4, 5)
    gm = _export(BnDropout().train(), x)
    counter = gm.bn.num_batches_tracked
    gm(x)
    assert int(counter) == 1
    qcore.move_exported_model_to_eval(gm)
    gm(x)
    gm(x)
    assert int(counter) == 1  # eager batch norm does not count in eval
    qcore.move_exported_model_to_train(gm)
    gm(x)
    assert int(counter) == 2
