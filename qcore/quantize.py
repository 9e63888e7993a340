"""One call from a float model to a quantized, lowered one: ``qcore.quantize``; ``qcore.load``.

``quantize`` runs the whole pt2e flow for a backend: export, annotate with the backend's
quantizer and its default config, calibrate, convert, lower (when the backend has lowering
passes) and measure what happened (a :class:`qcore.report.QuantizationReport`).

>>> import torch, qcore
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
>>> example = (torch.randn(2, 8),)
>>> result = qcore.quantize(model, example, backend="onednn",
...                         calibration=[(torch.randn(2, 8),) for _ in range(4)])
>>> result.lowered(*example).shape
torch.Size([2, 4])
>>> [n.name for n in result.report.nodes if n.quantized]
['linear', 'linear_1']
>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "model.pt2")
>>> result.save(path)
>>> qcore.load(path)(*example).shape
torch.Size([2, 4])

Calibration batches are a tensor or a tuple of the model's positional inputs; extra trailing
items (labels from a ``DataLoader``) are ignored. Their shapes must match ``example_inputs``
except in the dimensions ``dynamic_shapes`` makes dynamic.

Quantization-aware training fine-tunes a copy of the model with fake quantization before
converting: ``qat=True`` with ``qat_epochs`` (the built-in loop over batches of ``(x, target)``)
or with ``train_fn`` (your own loop); see :func:`quantize` and ``qcore.qat_training``.

>>> _ = torch.manual_seed(0)
>>> data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
>>> result = qcore.quantize(model, data[0][:1], backend="onednn", qat=True, qat_epochs=2, qat_lr=1e-3,
...                         calibration=data, measure_latency=False)
>>> result.report.training.epochs, len(result.report.training.epoch_losses)
(2, 2)
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
import traceback
from typing import Any, Callable, Iterable, Optional

import attrs
import torch
from torch.fx import GraphModule

from qcore.errors import QcoreError

__all__ = ["quantize", "load", "QuantizeResult", "QuantizeError", "ExportFailedError", "CalibrationShapeError"]

#: ``progress(iterable, desc)`` wraps an iterable in a progress bar; the default shows none.
ProgressFn = Callable[[Iterable, str], Iterable]

BACKEND_EXTRA_FILE = "qcore.json"


class QuantizeError(QcoreError):
    """``qcore.quantize``, ``save`` or ``load`` cannot do what was asked (the message says why)."""


class ExportFailedError(QuantizeError):
    """``torch.export`` could not capture the model."""


class CalibrationShapeError(QuantizeError, ValueError):
    """A calibration batch whose shapes do not match the example inputs."""


def _no_progress(iterable: Iterable, desc: str) -> Iterable:
    return iterable


@attrs.define
class QuantizeResult:
    """What :func:`quantize` made.

    ``converted``: the quantized program (a q/dq GraphModule, portable, what ``save`` writes);
    ``lowered``: ``converted`` rewritten into the backend's kernels (None when the backend has no
    lowering passes); ``exported``: the float program it started from; ``report``: per-node
    decisions, SQNR and latency.
    """

    converted: GraphModule
    lowered: Optional[GraphModule]
    exported: GraphModule
    report: Any
    backend: str
    example_inputs: tuple
    dynamic_shapes: Any = None

    @property
    def model(self) -> GraphModule:
        """The fastest runnable form: ``lowered`` if there is one, else ``converted``."""
        return self.lowered if self.lowered is not None else self.converted

    def save(self, path: "str | os.PathLike") -> None:
        """Write the converted program to ``path`` with ``torch.export.save``, atomically."""
        save(self.converted, path, self.example_inputs, dynamic_shapes=self.dynamic_shapes, backend=self.backend,
             target=self.converted.meta.get("qcore_target"))


# --------------------------------------------------------------------------- quantize
def quantize(
    model: torch.nn.Module,
    example_inputs: Any,
    backend: str = "onednn",
    calibration: Optional[Iterable] = None,
    qat: bool = False,
    config: Any = None,
    dynamic_shapes: Any = None,
    progress: Optional[ProgressFn] = None,
    measure_latency: bool = True,
    lower: bool = True,
    train_fn: Optional[Callable[[GraphModule], None]] = None,
    qat_epochs: Optional[int] = None,
    qat_lr: Optional[float] = None,
    loss_fn: Optional[Callable[..., torch.Tensor]] = None,
    target: Optional[str] = None,
) -> QuantizeResult:
    """Quantize ``model`` for ``backend``: export, annotate, calibrate (or train), convert, lower, report.

    >>> import torch, qcore
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    >>> result = qcore.quantize(model, (torch.randn(2, 8),), backend="onednn", measure_latency=False)
    >>> result.lowered(torch.randn(2, 8)).shape
    torch.Size([2, 8])

    ``calibration``: an iterable of batches (default: ``[example_inputs]``). ``config``: a
    ``qcore.QuantizationConfig`` for ``set_global`` (default: the backend quantizer's
    ``default_config()``). ``dynamic_shapes`` goes to ``torch.export.export``. ``lower=False``
    skips lowering; ``measure_latency=False`` skips timing; ``progress`` wraps each stage's
    iterable (e.g. in a tqdm bar).

    ``qat=True``: quantization-aware training of a copy of the model (exported in train mode,
    fake-quantized with the backend's QAT config), then convert. Give exactly one of:

    * ``train_fn``: ``train_fn(prepared)`` runs your training loop on the prepared module (in
      train mode) and returns None; ``calibration`` must then be None.
    * ``qat_epochs``: the built-in loop, ``qat_epochs`` passes over ``calibration``, whose
      batches are the inputs followed by the target(s) (``(x, y)``): Adam with ``qat_lr``
      (default ``qcore.qat_training.DEFAULT_QAT_LR``), ``loss_fn(output, *targets)`` (default
      cross-entropy); from 2 epochs on, the last runs with ranges and batch norm frozen.

    ``result.report.training`` then records what ran (epochs, loss per epoch, final loss).
    Bad combinations raise ``qcore.qat_training.QATError`` naming the problem.

    ``target``: the hardware the program is for, when it is not this machine: passed to the
    backend quantizer's ``default_config(target=...)`` (the names are the backend's; ``qcore
    plugins`` shows this machine's). The program records it (``converted.meta["qcore_target"]``,
    kept by ``save``/``load``; this machine's target when None), so lowering on other hardware
    can say what it assumed. ``target`` chooses the default config: not with ``config``.
    The user's model is not changed.
    """
    import qcore
    from qcore.graph_copy import copy_graph_module
    from qcore.plugin_manager import get_plugin_manager
    from qcore.qat_training import check_qat_options, run_builtin_loop, run_train_fn
    from qcore.report import build_report

    check_qat_options(qat, train_fn, qat_epochs, qat_lr, loss_fn, calibration)
    progress = progress or _no_progress
    manager = get_plugin_manager()
    backend_record = manager.get_backend(backend)  # unknown or unavailable: a clear error now
    quantizer = _make_quantizer(backend_record, config, qat, target)
    example_inputs = _as_inputs(example_inputs)

    exported = None
    for _ in progress([None], "export"):
        exported = export_model(model, example_inputs, dynamic_shapes=dynamic_shapes, training=qat)
    expected = _input_shapes(exported)

    training = None
    sample: Optional[tuple] = None
    if qat:
        prepared = qcore.prepare_qat_pt2e(exported, quantizer)  # a copy: the user's tensors are not trained
        # The float reference for the report: the same graph in eval mode, so running it does
        # not update batch-norm statistics (its tensors are the user's model's).
        exported, _ = copy_graph_module(exported, copy_tensors=False)
        qcore.move_exported_model_to_eval(exported)
        if train_fn is not None:
            training = run_train_fn(prepared, train_fn)
        else:
            def split_batch(batch: Any, index: int) -> tuple:
                inputs, targets = _batch_inputs_and_targets(batch, len(expected), index)
                _check_shapes(inputs, expected, index)
                return inputs, targets

            training, sample = run_builtin_loop(
                prepared, calibration, qat_epochs, qat_lr, loss_fn, split_batch, progress
            )
        qcore.move_exported_model_to_eval(prepared)
    else:
        prepared = qcore.prepare_pt2e(exported, quantizer)
        batches = [example_inputs] if calibration is None else calibration
        count = 0
        with torch.no_grad():
            for index, batch in enumerate(progress(batches, "calibrate")):
                inputs = _batch_inputs(batch, len(expected), index)
                _check_shapes(inputs, expected, index)
                prepared(*inputs)
                sample = sample or inputs
                count += 1
        if count == 0:
            raise QuantizeError("calibration is empty: give at least one batch (or calibration=None to use example_inputs)")
    converted = qcore.convert_pt2e(prepared)
    hardware = dict(backend_record.hardware() or {})
    recorded_target = target if target is not None else hardware.get("target")
    if recorded_target is not None and config is None:
        converted.meta["qcore_target"] = recorded_target

    lowered = None
    if lower and manager.lowering_passes(backend):
        for _ in progress([None], "lower"):
            lowered = qcore.lower(converted, backend=backend, example_inputs=example_inputs)
    report = build_report(
        exported, converted, lowered, backend=backend, sample_inputs=sample or example_inputs,
        measure_latency=measure_latency, training=training, hardware=hardware,
    )
    return QuantizeResult(
        converted=converted, lowered=lowered, exported=exported, report=report, backend=backend,
        example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
    )


def _make_quantizer(backend_record: Any, config: Any, qat: bool, target: Optional[str] = None) -> Any:
    quantizer_class = backend_record.quantizer_class
    if config is not None and target is not None:
        raise QuantizeError(
            f"target={target!r} chooses the backend's default config; with config= give a config made for that "
            f"target (e.g. {quantizer_class.__name__}.default_config(target={target!r}))"
        )
    if config is None:
        default_config = getattr(quantizer_class, "default_config", None)
        if not callable(default_config):
            raise QuantizeError(
                f"backend {backend_record.name!r}: its quantizer {quantizer_class.__name__} has no default_config(); "
                f"pass config=<a qcore.QuantizationConfig>"
            )
        if target is None:
            config = default_config(is_qat=qat)
        elif "target" not in inspect.signature(default_config).parameters:
            raise QuantizeError(
                f"backend {backend_record.name!r} has no targets: {quantizer_class.__name__}.default_config() "
                f"takes no target; leave target=None"
            )
        else:
            try:
                config = default_config(is_qat=qat, target=target)
            except ValueError as exc:
                raise QuantizeError(f"backend {backend_record.name!r}: {exc}") from exc
    return quantizer_class().set_global(config)


def _as_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of the model's positional inputs, got {type(example_inputs).__name__}")


def _batch_inputs(batch: Any, n_inputs: int, index: int) -> tuple:
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if not isinstance(batch, (tuple, list)):
        raise CalibrationShapeError(
            f"calibration batch {index}: expected a tensor or a tuple of {n_inputs} input tensor(s), got {type(batch).__name__}"
        )
    if len(batch) < n_inputs:
        raise CalibrationShapeError(
            f"calibration batch {index}: expected {n_inputs} input(s) like example_inputs, got {len(batch)}"
        )
    return tuple(batch[:n_inputs])  # trailing items (labels) are ignored


def _batch_inputs_and_targets(batch: Any, n_inputs: int, index: int) -> tuple:
    """``(inputs, targets)`` of a QAT batch: the model's inputs, then at least one target."""
    from qcore.qat_training import QATError

    if not isinstance(batch, (tuple, list)) or len(batch) <= n_inputs:
        got = f"a tuple of {len(batch)} item(s)" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise QATError(
            f"QAT batch {index}: the built-in loop needs the model's {n_inputs} input(s) followed by the target(s) "
            f"for loss_fn, e.g. (x, y); got {got}. Make the calibration batches carry targets, or pass train_fn"
        )
    return tuple(batch[:n_inputs]), tuple(batch[n_inputs:])


def _shape_text(shape: Any) -> str:
    return "(" + ", ".join("*" if not isinstance(d, int) else str(d) for d in shape) + ")"


def _input_shapes(exported: GraphModule) -> list:
    shapes = []
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            shapes.append(tuple(value.shape) if isinstance(value, torch.Tensor) else None)
    return shapes


def _check_shapes(inputs: tuple, expected: list, index: int) -> None:
    for position, (value, shape) in enumerate(zip(inputs, expected)):
        if shape is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise CalibrationShapeError(
                f"calibration batch {index}, input {position}: expected a tensor of shape {_shape_text(shape)}, got {type(value).__name__}"
            )
        got = tuple(value.shape)
        fits = len(got) == len(shape) and all(not isinstance(d, int) or d == g for d, g in zip(shape, got))
        if not fits:
            raise CalibrationShapeError(
                f"calibration batch {index}, input {position}: expected shape {_shape_text(shape)} "
                f"(as example_inputs; * = dynamic), got {_shape_text(got)}"
                + ("; make the batch dimension dynamic with dynamic_shapes" if len(got) == len(shape) and got[1:] == tuple(shape[1:]) else "")
            )


# --------------------------------------------------------------------------- export
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


# --------------------------------------------------------------------------- save / load
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
    example_inputs = _as_inputs(example_inputs)
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
