"""Switch an exported graph between training and inference behaviour.

Exported graphs bake the mode into literal arguments, so ``model.train()`` cannot change them.
This pass flips exactly those literals and nothing else, keeping the user's batch-norm eps and
momentum and dropout p:

Before (train)::

    batch_norm(x, w, b, mean, var, True, 0.1, 1e-05, False)
    dropout(x, 0.3, True)

After (eval)::

    batch_norm(x, w, b, mean, var, False, 0.1, 1e-05, False)
    dropout(x, 0.3, False)

A train-mode export also counts batches (``num_batches_tracked.add_(1)`` before each batch
norm; a batch norm called twice chains ``add_(add_(num_batches_tracked, 1), 1)``); in eval mode
every increment becomes 0, as eager batch norm does not count in eval. In-place dropout
(``Dropout(inplace=True)``, exported as ``dropout_``) is flipped like ``dropout``.

Exported models do not follow ``model.train()`` / ``model.eval()``: :func:`disallow_train_eval`
makes those calls raise ``NotImplementedError`` (prepare and convert apply it, as torchao's do) and
:func:`allow_exported_model_train_eval` makes them call this pass instead.
"""

from __future__ import annotations

import types

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# op -> index of its "training" literal
_MODE_ARG = {
    aten.batch_norm.default: 5,
    aten.dropout.default: 2,
    aten.native_dropout.default: 2,
    aten.feature_dropout.default: 2,
    aten.alpha_dropout.default: 2,
    aten.dropout_.default: 2,
    aten.feature_dropout_.default: 2,
    aten.alpha_dropout_.default: 2,
    aten.feature_alpha_dropout.default: 2,
    aten.feature_alpha_dropout_.default: 2,
}

TRAIN_EVAL_ERROR = (
    "calling train() or eval() on an exported model does not switch its batch norm and dropout "
    "(the mode is baked into the graph); call qcore.move_exported_model_to_train(model) or "
    "qcore.move_exported_model_to_eval(model), or qcore.allow_exported_model_train_eval(model) "
    "to make train()/eval() do that"
)


def _is_batch_counter(node: Node) -> bool:
    """``num_batches_tracked.add_(n)`` as a train-mode export of batch norm writes it."""
    if node.op != "call_function" or node.target is not aten.add_.Tensor or len(node.args) < 2:
        return False
    counter = node.args[0]
    while isinstance(counter, Node) and counter.op == "call_function" and counter.target is aten.add_.Tensor:
        counter = counter.args[0]  # a batch norm called twice: add_(add_(num_batches_tracked, 1), 1)
    return isinstance(counter, Node) and counter.op == "get_attr" and counter.target.endswith("num_batches_tracked")


def set_training_mode(model: GraphModule, training: bool) -> bool:
    """Set every mode literal of ``model`` in place; returns True if a literal changed."""
    changed = False
    for node in model.graph.nodes:
        if _is_batch_counter(node):
            step = 1 if training else 0
            if node.args[1] != step:
                node.args = (node.args[0], step, *node.args[2:])
                changed = True
            continue
        index = _MODE_ARG.get(node.target) if node.op == "call_function" else None
        if index is None:
            continue
        if index < len(node.args):
            if node.args[index] != training:
                args = list(node.args)
                args[index] = training
                node.args = tuple(args)
                changed = True
        else:
            name = "training" if node.target is aten.batch_norm.default else "train"
            if node.kwargs.get(name) != training:
                node.kwargs = {**node.kwargs, name: training}
                changed = True
    torch.nn.Module.train(model, training)
    if changed:
        model.recompile()
    return changed


def disallow_train_eval(model: GraphModule) -> GraphModule:
    """Make ``model.train()`` and ``model.eval()`` raise ``NotImplementedError`` (in place).

    >>> import torch
    >>> gm = disallow_train_eval(torch.fx.symbolic_trace(torch.nn.ReLU()))
    >>> gm.eval()
    Traceback (most recent call last):
    ...
    NotImplementedError: calling train() or eval() on an exported model does not switch ...
    """

    def _train(self: GraphModule, mode: bool = True) -> GraphModule:
        raise NotImplementedError(TRAIN_EVAL_ERROR)

    def _eval(self: GraphModule) -> GraphModule:
        raise NotImplementedError(TRAIN_EVAL_ERROR)

    model.train = types.MethodType(_train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(_eval, model)  # type: ignore[method-assign]
    return model


def allow_exported_model_train_eval(model: GraphModule) -> GraphModule:
    """Let ``model.train()`` / ``model.eval()`` switch an exported model's batch norms and
    dropouts (what ``qcore.move_exported_model_to_train`` / ``_to_eval`` do), in place.

    Only those ops change: code that branched on ``self.training`` was specialised at export.

    >>> import torch
    >>> gm = torch.export.export(torch.nn.Dropout(0.5), (torch.ones(8),)).module()
    >>> _ = allow_exported_model_train_eval(gm).eval()
    >>> bool((gm(torch.ones(8)) == 1).all()), gm.training
    (True, False)
    """

    def _train(self: GraphModule, mode: bool = True) -> GraphModule:
        set_training_mode(self, bool(mode))
        return self

    def _eval(self: GraphModule) -> GraphModule:
        set_training_mode(self, False)
        return self

    model.train = types.MethodType(_train, model)  # type: ignore[method-assign]
    model.eval = types.MethodType(_eval, model)  # type: ignore[method-assign]
    return model
