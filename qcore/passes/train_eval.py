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
norm); in eval mode the increment becomes 0, as eager batch norm does not count in eval.
"""

from __future__ import annotations

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
}


def _is_batch_counter(node: Node) -> bool:
    """``num_batches_tracked.add_(n)`` as a train-mode export of batch norm writes it."""
    if node.op != "call_function" or node.target is not aten.add_.Tensor or len(node.args) < 2:
        return False
    counter = node.args[0]
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
