"""Switching an exported graph between training and inference (``qcore/passes/train_eval.py``,
``qcore.move_exported_model_to_eval`` / ``_train``)."""

from __future__ import annotations

import copy

import pytest
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


# --------------------------------------------------------------------------- in-place dropout
class LinearInplaceDropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 6)
        self.dropout = torch.nn.Dropout(0.5, inplace=True)
        self.feature = torch.nn.Dropout1d(0.25, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.dropout(self.linear(x)))


def test_inplace_dropout_is_flipped_both_ways():
    model = LinearInplaceDropout()
    x = torch.randn(16, 8, 4)
    gm = _export(model.train(), x)
    (dropout,) = _calls(gm, aten.dropout_.default)
    (alpha,) = _calls(gm, aten.feature_dropout_.default)
    assert dropout.args[1:] == (0.5, True) and alpha.args[1:] == (0.25, True)
    qcore.move_exported_model_to_eval(gm)
    assert dropout.args[1:] == (0.5, False) and alpha.args[1:] == (0.25, False)
    torch.testing.assert_close(gm(x), model.linear(x))  # both dropouts are the identity in eval
    qcore.move_exported_model_to_train(gm)
    assert dropout.args[1:] == (0.5, True) and alpha.args[1:] == (0.25, True)
    eager = copy.deepcopy(model).train()
    torch.manual_seed(3)
    got = gm(x)
    torch.manual_seed(3)
    torch.testing.assert_close(got, eager(x))
    assert not torch.allclose(got, model.linear(x))


# --------------------------------------------------------------------------- a batch norm called twice
class SharedBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(self.conv(x))))


def test_batch_norm_called_twice_counts_twice_in_train_and_never_in_eval():
    model = SharedBn()
    x = torch.randn(2, 3, 5, 5)
    gm = _export(model.train(), x)
    counters = _calls(gm, aten.add_.Tensor)
    assert len(counters) == 2 and counters[1].args[0] is counters[0]  # the chain export writes
    gm(x)
    assert int(gm.bn.num_batches_tracked) == 2
    qcore.move_exported_model_to_eval(gm)
    assert [c.args[1] for c in counters] == [0, 0]
    mean = gm.bn.running_mean.clone()
    out = gm(x)
    assert int(gm.bn.num_batches_tracked) == 2
    torch.testing.assert_close(gm.bn.running_mean, mean)
    reference = copy.deepcopy(model).eval()
    reference.load_state_dict(gm.state_dict(), strict=False)
    torch.testing.assert_close(out, reference(x))
    qcore.move_exported_model_to_train(gm)
    assert [c.args[1] for c in counters] == [1, 1]
    gm(x)
    assert int(gm.bn.num_batches_tracked) == 4


# --------------------------------------------------------------------------- model.train() / model.eval()
def _prepared_and_converted():
    from qcore.testing.toy import ToyLinearQuantizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    x = torch.randn(8, 4)
    prepared = qcore.prepare_qat_pt2e(_export(model.train(), x), ToyLinearQuantizer(is_qat=True))
    prepared(x)
    return model, x, prepared, qcore.convert_pt2e(prepared)


def test_train_and_eval_on_prepared_and_converted_models_raise():
    _, _, prepared, converted = _prepared_and_converted()
    for gm in (prepared, converted):
        for call in (gm.train, gm.eval, lambda: gm.train(False)):
            with pytest.raises(NotImplementedError, match=r"qcore.move_exported_model_to_eval\(model\)"):
                call()
    assert prepared.training  # nothing switched


def test_allow_exported_model_train_eval_switches_batch_norm_and_dropout():
    model, x, prepared, _ = _prepared_and_converted()
    assert qcore.allow_exported_model_train_eval(prepared) is prepared
    prepared.eval()
    assert not prepared.training
    (bn,) = _calls(prepared, aten.batch_norm.default)
    (dropout,) = _calls(prepared, aten.dropout.default)
    assert bn.args[5] is False and dropout.args[2] is False
    torch.testing.assert_close(prepared(x), prepared(x))  # deterministic in eval
    prepared.train()
    assert prepared.training and bn.args[5] is True and dropout.args[2] is True
    prepared.train(False)
    assert bn.args[5] is False


def test_the_users_exported_module_keeps_its_own_rule():
    gm = _export(BnDropout(), torch.randn(8, 4, 5))
    with pytest.raises(NotImplementedError):
        gm.train()
    qcore.allow_exported_model_train_eval(gm)
    gm.eval()
    (bn,) = _calls(gm, aten.batch_norm.default)
    assert bn.args[5] is False
