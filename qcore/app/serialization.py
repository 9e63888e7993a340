"""Save and load quantized programs: ``torch.export`` files written atomically, with the backend
name and target stored beside the program (``qcore.json``).

>>> import os, tempfile, torch, qcore
>>> result = qcore.quantize(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),), backend="reference", measure_latency=False)
>>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
>>> result.save(path)
>>> load(path).meta["qcore_backend"]
'reference'
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qcore.app.export import as_inputs
from qcore.errors import QuantizeError

BACKEND_EXTRA_FILE = "qcore.json"


def save(
    converted: GraphModule,
    path: "str | os.PathLike",
    example_inputs: Any,
    dynamic_shapes: Any = None,
    backend: Optional[str] = None,
    target: Optional[str] = None,
) -> None:
    """Write ``converted`` to ``path`` as a ``torch.export`` program: to a temporary file in the
    same directory, then ``os.replace``; on any error nothing is left at ``path``. ``backend``
    and ``target`` (the hardware it was quantized for) are stored beside the program."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise QuantizeError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise QuantizeError(f"cannot write {path}: it is a directory; give a file name such as model.pt2")
    example_inputs = as_inputs(example_inputs)
    program = torch.export.export(_without_unused_state(converted), example_inputs, dynamic_shapes=dynamic_shapes)
    try:
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp.pt2")
    except OSError as exc:
        raise QuantizeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(handle)
    try:
        extra = {BACKEND_EXTRA_FILE: json.dumps({"backend": backend, "target": target, "format": 1})}
        torch.export.save(program, temporary, extra_files=extra)
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise QuantizeError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _without_unused_state(model: GraphModule) -> GraphModule:
    """A copy of ``model`` without the parameters, buffers and submodules its graph never reads
    (the float weights that convert replaced by int8 ones, leftover observers): they would be saved."""
    from qcore.graph_copy import copy_graph_module

    used = {node.target for node in model.graph.nodes if node.op in ("get_attr", "call_module")}
    copy, _ = copy_graph_module(model, copy_tensors=False)
    for name, _ in list(copy.named_parameters()) + list(copy.named_buffers()):
        if name in used or any(name.startswith(target + ".") for target in used):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = copy.get_submodule(owner_name) if owner_name else copy
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
    copy.delete_all_unused_submodules()
    return copy


def load(path: "str | os.PathLike") -> GraphModule:
    """Read a program written by ``QuantizeResult.save``; returns the converted GraphModule
    (its backend name and target, if saved, in ``meta["qcore_backend"]`` and
    ``meta["qcore_target"]``), ready for ``qcore.lower``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QuantizeError(f"cannot load {path}: no such file")
    import qcore.passes.qdq_ops  # noqa: F401  (registers quantized_decomposed ops before deserialising)

    extra = {BACKEND_EXTRA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise QuantizeError(f"cannot load {path}: not a torch.export program ({type(exc).__name__}: {exc})") from exc
    module = program.module()
    try:
        stored = json.loads(extra[BACKEND_EXTRA_FILE] or "{}")
    except ValueError:
        stored = {}
    module.meta["qcore_backend"] = stored.get("backend")
    if stored.get("target") is not None:
        module.meta["qcore_target"] = stored["target"]
    return module
