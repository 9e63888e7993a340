"""``torch.export`` of the user's model for ``qcore.quantize``, with a one-line diagnosis when it fails.

>>> import torch
>>> gm = export_model(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
>>> [n.op for n in gm.graph.nodes].count("placeholder")
1
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qcore.errors import ExportFailedError


def as_inputs(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple of the model's positional inputs (a lone tensor is wrapped)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of the model's positional inputs, got {type(example_inputs).__name__}")


def export_model(model: Any, example_inputs: tuple, dynamic_shapes: Any = None, training: bool = False) -> GraphModule:
    """``torch.export`` ``model`` (in eval mode unless ``training``; the mode is restored) to a GraphModule.

    A failure raises :class:`ExportFailedError` naming the error, where in the model it happened
    and a hint.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module to quantize, got {type(model).__name__}")
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes).module()
    except Exception as exc:
        raise ExportFailedError(_export_failure_message(model, exc)) from exc
    finally:
        for module, mode in modes.items():
            module.training = mode


def _export_failure_message(model: torch.nn.Module, exc: BaseException) -> str:
    lines = [line.rstrip() for line in str(exc).splitlines()]
    summary = next(
        (line.strip() for line in lines if line.strip() and not line.startswith((" ", "\t", "def ", "#"))),
        type(exc).__name__,
    )
    node = _failing_graph_node(lines)
    where = _failing_user_line(model, exc, lines)
    hint = (
        "hint: torch.export needs a graph without data-dependent Python control flow "
        "(use torch.cond or move the branch out of forward), without unsupported Python calls, "
        "and with dynamic_shapes for dimensions that change between batches"
    )
    parts = [f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {summary}"]
    if node:
        parts.append(f"node {node}")
    if where:
        parts.append(f"at {where}")
    return "; ".join(parts + [hint])


_GRAPH_LINE = re.compile(r"^\s*(\w+): .*= torch\.ops\.([\w.]+)\(")


def _failing_graph_node(lines: list) -> str:
    """The last node of the partial graph export printed before failing: ``name (op)``."""
    found = ""
    for line in lines:
        match = _GRAPH_LINE.match(line)
        if match:
            found = f"{match.group(1)} ({match.group(2)})"
    return found


def _failing_user_line(model: torch.nn.Module, exc: BaseException, lines: list) -> str:
    """``file:line in function: code`` of the deepest frame in the model's own source, if any."""
    files = set()
    for module in model.modules():
        try:
            files.add(os.path.abspath(inspect.getsourcefile(type(module)) or ""))
        except TypeError:
            continue
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    files = {f for f in files if f and not f.startswith(torch_dir)}
    found = ""
    for index, line in enumerate(lines):  # export names the user frame in its message
        match = re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', line)
        if match and os.path.abspath(match.group(1)) in files:
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            found = f"{os.path.basename(match.group(1))}:{match.group(2)} in {match.group(3)}: {code}"
    if found:
        return found
    seen: set = set()
    error: Optional[BaseException] = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for frame in traceback.extract_tb(error.__traceback__):
            if os.path.abspath(frame.filename) in files:
                found = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: {frame.line}"
        error = error.__cause__ or error.__context__
    return found
