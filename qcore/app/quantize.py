"""One call from a float model to a quantized, lowered one: ``qcore.quantize``; ``qcore.load``.

``quantize`` runs the whole pt2e flow for a backend: export, annotate with the backend's
quantizer and its default config, calibrate, convert, lower (when the backend has lowering
passes) and measure what happened (a :class:`qcore.app.report.QuantizationReport`).

>>> import torch, qcore
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
>>> example = (torch.randn(2, 8),)
>>> result = qcore.quantize(model, example, backend="reference",
...                         calibration=[(torch.randn(2, 8),) for _ in range(4)])
>>> result.model(*example).shape
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
or with ``train_fn`` (your own loop); see :func:`quantize` and ``qcore.app.qat_training``.

>>> _ = torch.manual_seed(0)
>>> data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
>>> result = qcore.quantize(model, data[0][:1], backend="reference", qat=True, qat_epochs=2, qat_lr=1e-3,
...                         calibration=data, measure_latency=False)
>>> result.report.training.epochs, len(result.report.training.epoch_losses)
(2, 2)
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterable, Optional

import attrs
import torch
from torch.fx import GraphModule

from qcore.app.export import as_inputs, export_model
from qcore.app.serialization import load, save
from qcore.errors import CalibrationShapeError, ExportFailedError, QuantizeError

__all__ = ["quantize", "load", "QuantizeResult", "QuantizeError", "ExportFailedError", "CalibrationShapeError"]

#: ``progress(iterable, desc)`` wraps an iterable in a progress bar; the default shows none.
ProgressFn = Callable[[Iterable, str], Iterable]


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
    backend: str,
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
    shard_calibration: bool = True,
    smooth_quant: Optional[float] = None,
    bias_correction: bool = False,
    algorithms: Optional[dict] = None,
    min_sqnr_db: Optional[float] = None,
    accuracy_fn: Optional[Callable[[Any], float]] = None,
    max_drop: float = 0.01,
    max_float: Optional[int] = None,
    strict: bool = True,
    quantizer_options: Optional[dict] = None,
) -> QuantizeResult:
    """Quantize ``model`` for ``backend``: export, annotate, calibrate (or train), convert, lower, report.

    >>> import torch, qcore
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    >>> result = qcore.quantize(model, (torch.randn(2, 8),), backend="reference", measure_latency=False)
    >>> result.model(torch.randn(2, 8)).shape
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
      (default ``qcore.app.qat_training.DEFAULT_QAT_LR``), ``loss_fn(output, *targets)`` (default
      cross-entropy); from 2 epochs on, the last runs with ranges and batch norm frozen.

    ``result.report.training`` then records what ran (epochs, loss per epoch, final loss).
    Bad combinations raise ``qcore.app.qat_training.QATError`` naming the problem.

    ``target``: the hardware the program is for, when it is not this machine: passed to the
    backend quantizer's ``default_config(target=...)`` (the names are the backend's; ``qcore
    plugins`` shows this machine's). The program records it (``converted.meta["qcore_target"]``,
    kept by ``save``/``load``; this machine's target when None), so lowering on other hardware
    can say what it assumed. ``target`` chooses the default config: not with ``config``.
    The user's model is not changed.

    Under ``torchrun`` (a ``torch.distributed`` process group with several ranks; see
    ``qcore.distributed``): each rank calibrates its share of ``calibration`` (round robin; with
    ``shard_calibration=False`` all of it, for a loader that already shards), the observers are
    synced so every rank converts the same program (checked), and ``train_fn`` runs on every rank
    (wrap the module in DistributedDataParallel there) with fake-quant ranges and batch norms
    synced after it; the built-in QAT loop does not run distributed.

    Accuracy beyond plain calibration (post-training only; see ``qcore.accuracy``):

    * ``smooth_quant=alpha`` (in (0, 1), e.g. 0.5): SmoothQuant before annotation
      (``qcore.accuracy.smooth_quant``); ``bias_correction=True``: each quantized conv/linear's
      mean output error over the calibration batches goes into its bias before lowering
      (``qcore.accuracy.correct_bias``); ``algorithms={name: value}`` runs any algorithm a
      plugin registers (``qcore_register_algorithms``; the two above are the core's own).
    * ``min_sqnr_db=35.0``: keep the fewest partitions float (greedy by sensitivity,
      re-measured) until the output SQNR vs float of what runs, over the calibration batches,
      reaches the target; ``accuracy_fn(model) -> float`` with ``max_drop``: until the metric
      on what runs is within ``max_drop`` of the float model's. ``max_float`` partitions at most
      (default all but one). Unreachable: ``qcore.accuracy.AccuracyTargetError`` naming the
      best value reached, or with ``strict=False`` a warning and the best model found. The
      report lists what stayed float and why (``report.kept_float``) and the first ranking
      (``report.sensitivity``).

    ``quantizer_options``: keyword arguments of the backend's quantizer class, e.g.
    ``{"sharing_recipe": "sqnr", "conv1d_conv3d": True}`` for the onednn backend's
    ``X86InductorQuantizer`` (an unknown name is an error listing the allowed ones).
    """
    import qcore
    from qcore.graph_copy import copy_graph_module
    from qcore.plugin_manager import get_plugin_manager
    from qcore.app.qat_training import check_qat_options, run_builtin_loop, run_train_fn
    from qcore.app.report import build_report

    check_qat_options(qat, train_fn, qat_epochs, qat_lr, loss_fn, calibration)
    from qcore.distributed import calibration as distributed

    distributed.check_distributed_options(qat, train_fn, shard_calibration)
    chosen = _chosen_algorithms(smooth_quant, bias_correction, algorithms)
    from qcore.accuracy.accuracy_target import check_target_options

    check_target_options(min_sqnr_db, accuracy_fn, max_drop, max_float, strict)
    wants_target = min_sqnr_db is not None or accuracy_fn is not None
    if (chosen or wants_target) and qat:
        raise QuantizeError(
            "smooth_quant, bias_correction, algorithms=, min_sqnr_db and accuracy_fn apply to post-training "
            "quantization: not with qat=True"
        )
    if (chosen or wants_target) and _world_size() > 1:
        raise QuantizeError("smooth_quant, bias_correction, algorithms=, min_sqnr_db and accuracy_fn run in one process: not under torchrun")
    progress = progress or _no_progress
    manager = get_plugin_manager()
    backend_record = manager.get_backend(backend)  # unknown or unavailable: a clear error now
    quantizer = _make_quantizer(backend_record, config, qat, target, quantizer_options)
    example_inputs = as_inputs(example_inputs)

    exported: Optional[GraphModule] = None
    for _ in progress([None], "export"):
        exported = export_model(model, example_inputs, dynamic_shapes=dynamic_shapes, training=qat)
    assert exported is not None, "progress() must yield the items of the iterable it wraps"
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
            distributed.finish_training(prepared)
        else:
            def split_batch(batch: Any, index: int) -> tuple:
                inputs, targets = _batch_inputs_and_targets(batch, len(expected), index)
                _check_shapes(inputs, expected, index)
                return inputs, targets

            assert calibration is not None and qat_epochs is not None  # check_qat_options: both given without train_fn
            training, sample = run_builtin_loop(
                prepared, calibration, qat_epochs, qat_lr, loss_fn, split_batch, progress
            )
        qcore.move_exported_model_to_eval(prepared)
    elif chosen or wants_target:
        return _quantize_for_accuracy(
            exported, quantizer, backend, example_inputs, calibration, chosen, lower, progress, measure_latency,
            backend_record, config, target, dynamic_shapes,
            dict(min_sqnr_db=min_sqnr_db, accuracy_fn=accuracy_fn, max_drop=max_drop, max_float=max_float, strict=strict)
            if wants_target else None,
        )
    else:
        prepared = qcore.prepare_pt2e(exported, quantizer)
        batches = [example_inputs] if calibration is None else distributed.batches_for_this_rank(calibration, shard_calibration)
        count = 0
        with torch.no_grad():
            for index, batch in enumerate(progress(batches, "calibrate")):
                inputs = _batch_inputs(batch, len(expected), index)
                _check_shapes(inputs, expected, index)
                prepared(*inputs)
                sample = sample or inputs
                count += 1
        count = distributed.finish_calibration(prepared, count)  # all ranks' batches; observers synced
        if count == 0:
            raise QuantizeError("calibration is empty: give at least one batch (or calibration=None to use example_inputs)")
    converted = qcore.convert_pt2e(prepared)
    distributed.check_ranks_agree(converted)
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


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _chosen_algorithms(smooth_quant: Any, bias_correction: Any, algorithms: Optional[dict]) -> list:
    """``[(Algorithm, value)]`` in run order (float stage first), each value checked; unknown names list the installed ones."""
    from qcore.plugin_manager import get_plugin_manager

    wanted: dict = {}
    if smooth_quant is not None:
        wanted["smooth_quant"] = smooth_quant
    if not isinstance(bias_correction, bool):
        raise QuantizeError(f"bias_correction must be True or False, got {bias_correction!r}")
    if bias_correction:
        wanted["bias_correction"] = True
    if algorithms is not None:
        if not isinstance(algorithms, dict):
            raise QuantizeError(f"algorithms must be a dict {{name: value}}, got {type(algorithms).__name__}")
        for name, value in algorithms.items():
            if name in wanted:
                raise QuantizeError(f"algorithm {name!r} is given twice (as a keyword and in algorithms=)")
            wanted[name] = value
    if not wanted:
        return []
    installed = get_plugin_manager().algorithms()
    chosen = []
    for name, value in wanted.items():
        record = installed.get(name)
        if record is None:
            raise QuantizeError(f"unknown algorithm {name!r}; installed algorithms: {', '.join(sorted(installed)) or 'none'}")
        if record.check is not None:
            try:
                record.check(value)
            except (TypeError, ValueError) as exc:
                raise QuantizeError(str(exc)) from exc
        chosen.append((record, value))
    return sorted(chosen, key=lambda item: item[0].stage != "float")


def _apply_algorithms(model: GraphModule, chosen: list, stage: str, context: Any) -> GraphModule:
    for record, value in chosen:
        if record.stage == stage:
            result = record.fn(model, value, context)
            if result is not None:
                if not isinstance(result, GraphModule):
                    raise QuantizeError(
                        f"algorithm {record.name!r} of plugin {record.plugin!r} returned {type(result).__name__}; "
                        f"expected a GraphModule or None"
                    )
                model = result
    return model


def _quantize_for_accuracy(
    exported: GraphModule, quantizer: Any, backend: str, example_inputs: tuple, calibration: Optional[Iterable],
    chosen: list, lower: bool, progress: ProgressFn, measure_latency: bool, backend_record: Any, config: Any,
    target: Optional[str], dynamic_shapes: Any, target_options: Optional[dict],
) -> "QuantizeResult":
    """The PTQ path of :func:`quantize` with accuracy algorithms and/or a target."""
    from qcore.accuracy.accuracy_target import search_float_partitions
    from qcore.accuracy.flow import Flow
    from qcore.app.report import build_report
    from qcore.graph_copy import copy_graph_module
    from qcore.records import AlgorithmContext

    batches = _checked_batches(exported, example_inputs, calibration)
    context = AlgorithmContext(backend=backend, calibration=batches, float_model=exported)
    graph, _ = copy_graph_module(exported)
    graph = _apply_algorithms(graph, chosen, "float", context)
    float_notes = list(context.notes)

    def finish(converted: GraphModule) -> GraphModule:
        del context.notes[len(float_notes):]  # the notes of the last build only
        return _apply_algorithms(converted, chosen, "converted", context)

    flow = Flow(graph, quantizer, backend=backend, calibration=batches, lower=lower, finish=finish, reference=exported)
    outcome = None
    if target_options is not None:
        outcome = search_float_partitions(flow, progress=progress, **target_options)
        built = outcome.built
    else:
        maybe = None
        for _ in progress([None], "calibrate, convert, lower"):
            maybe = flow.build({})
        assert maybe is not None, "progress() must yield the items of the iterable it wraps"
        built = maybe
    converted, lowered = built.converted, built.lowered
    hardware = dict(backend_record.hardware() or {})
    recorded_target = target if target is not None else hardware.get("target")
    if recorded_target is not None and config is None:
        converted.meta["qcore_target"] = recorded_target
    report = build_report(
        exported, converted, lowered, backend=backend, sample_inputs=batches[0],
        measure_latency=measure_latency, hardware=hardware,
    )
    report.algorithms = list(context.notes)
    if outcome is not None:
        report.accuracy_target = outcome.summary
        report.kept_float = list(outcome.kept_float)
        report.sensitivity = list(outcome.sensitivity)
    return QuantizeResult(
        converted=converted, lowered=lowered, exported=exported, report=report, backend=backend,
        example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
    )


def prepare_flow(
    model: torch.nn.Module,
    example_inputs: Any,
    backend: str,
    calibration: Optional[Iterable] = None,
    config: Any = None,
    lower: bool = True,
    dynamic_shapes: Any = None,
) -> Any:
    """The PTQ flow of :func:`quantize` as a ``qcore.accuracy.flow.Flow`` the accuracy tools
    run repeatedly: ``model`` exported in eval mode, the backend's quantizer, the calibration
    batches checked against the exported inputs."""
    from qcore.accuracy.flow import Flow
    from qcore.plugin_manager import get_plugin_manager

    backend_record = get_plugin_manager().get_backend(backend)
    quantizer = _make_quantizer(backend_record, config, False)
    example_inputs = as_inputs(example_inputs)
    exported = export_model(model, example_inputs, dynamic_shapes=dynamic_shapes, training=False)
    batches = _checked_batches(exported, example_inputs, calibration)
    return Flow(exported, quantizer, backend=backend, calibration=batches, lower=lower)


def _checked_batches(exported: GraphModule, example_inputs: tuple, calibration: Optional[Iterable]) -> list:
    expected = _input_shapes(exported)
    batches = []
    for index, batch in enumerate([example_inputs] if calibration is None else calibration):
        inputs = _batch_inputs(batch, len(expected), index)
        _check_shapes(inputs, expected, index)
        batches.append(inputs)
    if not batches:
        raise QuantizeError("calibration is empty: give at least one batch (or calibration=None to use example_inputs)")
    return batches


def _quantizer_instance(quantizer_class: type, options: Optional[dict]) -> Any:
    """``quantizer_class(**options)``, with an error naming the options the class takes."""
    if options is None:
        return quantizer_class()
    if not isinstance(options, dict):
        raise QuantizeError(f"quantizer_options must be a dict of {quantizer_class.__name__}'s arguments, got {options!r}")
    parameters = [name for name in inspect.signature(quantizer_class).parameters if name not in ("self", "args", "kwargs")]
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise QuantizeError(
            f"quantizer_options: {quantizer_class.__name__} takes no {', '.join(unknown)}; "
            f"allowed: {', '.join(parameters) or 'none'}"
        )
    try:
        return quantizer_class(**options)
    except (TypeError, ValueError) as exc:
        raise QuantizeError(f"quantizer_options: {exc}") from exc


def _make_quantizer(backend_record: Any, config: Any, qat: bool, target: Optional[str] = None,
                    options: Optional[dict] = None) -> Any:
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
    return _quantizer_instance(quantizer_class, options).set_global(config)


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
    from qcore.app.qat_training import QATError

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


