"""The public verbs: prepare, convert, switch mode, lower.

They keep the names and arguments of the old ``torch.ao.quantization.quantize_pt2e`` flow, so
code written for it ports by changing imports, and they reach every plugin through the hooks.
None of them changes the model it is given.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch.fx import GraphModule

from qcore.coverage import report_coverage
from qcore.errors import ConvertError, NotExportedError
from qcore.graph_copy import copy_graph_module, remap_annotations
from qcore.passes.convert_observers import convert_observers, is_obs_or_fq_node
from qcore.passes.duplicate_dequantize import duplicate_dequantize
from qcore.passes.fold_batch_norm import fold_batch_norm
from qcore.passes.fold_quantize_into_mutable_buffers import fold_quantize_into_mutable_buffers
from qcore.passes.fold_conv_bn_qat import fold_conv_bn_qat
from qcore.passes.fold_weight_quantize import fold_weight_quantize
from qcore.passes.insert_observers import PREPARED_META
from qcore.passes.quantize_subgraphs import is_higher_order_call, map_bodies
from qcore.passes.train_eval import disallow_train_eval, set_training_mode
from qcore.plugin_manager import get_plugin_manager
from qcore.records import LoweringContext

log = logging.getLogger(__name__)

CONVERTED_META = "qcore_converted"

_HOW_TO_EXPORT = (
    "capture it first: `model = torch.export.export(float_model, example_inputs).module()` "
    "and pass that GraphModule"
)


def _check_exported(model: Any, verb: str, calls_modules: bool = True) -> None:
    """Refuse what is not an aten-level GraphModule. Any tracer's graph is accepted when every
    call is an aten operator (torch.export's, make_fx's, or a torch.fx.symbolic_trace of code
    that calls torch.ops.aten.* itself), since the annotators match aten operators only; a
    symbolic_trace graph of torch functions or nn.Modules is refused, naming the first node no
    annotator could match. ``calls_modules=False`` (prepare) also refuses ``call_module`` nodes
    other than torch.export's guard function."""
    if not isinstance(model, GraphModule):
        raise NotExportedError(f"{verb} expects an exported torch.fx.GraphModule, got {type(model).__name__}; {_HOW_TO_EXPORT}")
    for node in model.graph.nodes:
        if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload):
            if is_higher_order_call(node):  # control flow: its bodies are GraphModules of their own
                continue
            if node.target.__module__ in ("_operator", "operator") or getattr(node.target, "__name__", "") == "getitem":
                continue
            raise NotExportedError(
                f"{verb} expects an aten-level graph from torch.export, but node {node.name!r} calls "
                f"{getattr(node.target, '__qualname__', node.target)} (a symbolic_trace graph?), which no "
                f"annotator matches (they match torch.ops.aten operators); {_HOW_TO_EXPORT}"
            )
        if node.op == "call_module" and not calls_modules and node.target != "_guards_fn" and not is_obs_or_fq_node(model, node):
            module = model.get_submodule(node.target)
            raise NotExportedError(
                f"{verb} expects an aten-level graph from torch.export, but node {node.name!r} calls module "
                f"{node.target!r} ({type(module).__name__}; a symbolic_trace graph?), which no annotator "
                f"matches (they match torch.ops.aten operators); {_HOW_TO_EXPORT}"
            )


def _check_quantizer(quantizer: Any) -> None:
    missing = [name for name in ("annotate", "validate") if not callable(getattr(quantizer, name, None))]
    if missing:
        raise TypeError(
            f"expected a quantizer (an object with annotate, validate and optionally "
            f"transform_for_annotation), got {type(quantizer).__name__} without {', '.join(missing)}"
        )


def _prepare(model: GraphModule, quantizer: Any, is_qat: bool, verb: str) -> GraphModule:
    _check_exported(model, verb, calls_modules=False)
    _check_quantizer(quantizer)
    model, _ = copy_graph_module(model, recompile=False)  # insert_observers recompiles
    if not is_qat:
        fold_batch_norm(model)  # as the old flow did: PTQ annotates conv -> relu, BN folded in
    transform = getattr(quantizer, "transform_for_annotation", None)
    if callable(transform):
        model = transform(model)
    quantizer.annotate(model)
    quantizer.validate(model)
    remap_annotations(model)  # foreign spec classes -> qcore's
    report_coverage(model, f"{type(quantizer).__name__}")
    manager = get_plugin_manager()
    if is_qat:
        manager.fuse_qat(model)
    callback = getattr(quantizer, "prepare_obs_or_fq_callback", None)
    prepared = manager.insert_observers(model, is_qat=is_qat, obs_or_fq_callback=callback if callable(callback) else None)
    prepared.meta[PREPARED_META] = {"is_qat": is_qat}
    disallow_train_eval(prepared)  # as torchao's: .train()/.eval() would not switch the graph
    map_bodies(prepared, lambda body: _prepare(body, quantizer, is_qat, verb))  # scan/while_loop/cond bodies
    return prepared


def prepare_pt2e(model: GraphModule, quantizer: Any) -> GraphModule:
    """Annotate ``model`` with ``quantizer`` and insert observers, ready for calibration.

    >>> import torch, qcore
    >>> from qcore.testing.toy import ToyLinearQuantizer
    >>> float_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> example = (torch.randn(2, 4),)
    >>> exported = torch.export.export(float_model, example).module()
    >>> prepared = qcore.prepare_pt2e(exported, ToyLinearQuantizer())
    >>> _ = prepared(*example)                        # calibrate
    >>> converted = qcore.convert_pt2e(prepared)
    >>> converted(*example).shape
    torch.Size([2, 4])
    """
    return _prepare(model, quantizer, is_qat=False, verb="prepare_pt2e")


def prepare_qat_pt2e(model: GraphModule, quantizer: Any) -> GraphModule:
    """Like :func:`prepare_pt2e` for quantization-aware training: conv-bn is fused for training
    and the quantizer's fake-quantizers are inserted.

    >>> import torch, qcore
    >>> from qcore.testing.toy import ToyLinearQuantizer
    >>> exported = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()
    >>> prepared = qcore.prepare_qat_pt2e(exported, ToyLinearQuantizer(is_qat=True))
    >>> prepared.meta["qcore_prepared"]["is_qat"]
    True
    """
    return _prepare(model, quantizer, is_qat=True, verb="prepare_qat_pt2e")


def convert_pt2e(
    model: GraphModule,
    use_reference_representation: bool = False,
    fold_quantize: bool = True,
    fold_quantize_into_mutable_buffers: bool = False,
) -> GraphModule:
    """Replace observers with quantize/dequantize ops (weights stored as integers if
    ``fold_quantize``), returning a new GraphModule.

    ``fold_quantize_into_mutable_buffers`` (needs ``fold_quantize``) also stores as integers a
    float buffer the program reads through q -> dq and writes back with ``copy_`` (a KV cache),
    see :mod:`qcore.passes.fold_quantize_into_mutable_buffers`.

    >>> import torch, qcore
    >>> from qcore.testing.toy import ToyLinearQuantizer
    >>> example = (torch.randn(2, 4),)
    >>> prepared = qcore.prepare_pt2e(torch.export.export(torch.nn.Linear(4, 4), example).module(),
    ...                               ToyLinearQuantizer())
    >>> _ = prepared(*example)
    >>> converted = qcore.convert_pt2e(prepared)
    >>> sorted({n.target.__name__ for n in converted.graph.nodes if n.op == "call_function" and "quantize" in str(n.target)})
    ['dequantize_per_channel.default', 'dequantize_per_tensor.default', 'quantize_per_tensor.default']
    """
    flags = (
        ("use_reference_representation", use_reference_representation),
        ("fold_quantize", fold_quantize),
        ("fold_quantize_into_mutable_buffers", fold_quantize_into_mutable_buffers),
    )
    for name, value in flags:
        if not isinstance(value, bool):
            raise TypeError(f"convert_pt2e: {name} must be True or False, got {value!r}")
    if fold_quantize_into_mutable_buffers and not fold_quantize:
        raise ValueError("convert_pt2e: fold_quantize_into_mutable_buffers=True requires fold_quantize=True")
    _check_exported(model, "convert_pt2e")
    if not model.meta.get(PREPARED_META) and not any(is_obs_or_fq_node(model, n) for n in model.graph.nodes):
        raise ConvertError(
            "convert_pt2e expects a model returned by prepare_pt2e or prepare_qat_pt2e (it has no observers); "
            "call qcore.prepare_pt2e(model, quantizer) and calibrate it first"
        )
    return _convert(model, use_reference_representation, fold_quantize, fold_quantize_into_mutable_buffers)


def _convert(model: GraphModule, use_reference_representation: bool, fold_quantize: bool, into_buffers: bool) -> GraphModule:
    model, _ = copy_graph_module(model, copy_tensors=False, recompile=False)
    map_bodies(model, lambda body: _convert(body, use_reference_representation, fold_quantize, into_buffers))
    convert_observers(model)
    fold_conv_bn_qat(model)
    duplicate_dequantize(model)
    if fold_quantize and into_buffers:
        fold_quantize_into_mutable_buffers(model)
    if fold_quantize:
        fold_weight_quantize(model)
    if use_reference_representation:
        from qcore.passes.reference_representation import rewrite_to_reference_representation

        rewrite_to_reference_representation(model)
    model.graph.eliminate_dead_code()
    model.graph.lint()
    model.recompile()
    model.meta.pop(PREPARED_META, None)
    model.meta[CONVERTED_META] = True
    disallow_train_eval(model)
    return model


def move_exported_model_to_eval(model: GraphModule) -> GraphModule:
    """Make batch norm use running statistics and dropout do nothing, in place.

    The user's batch-norm eps and momentum and dropout p are kept.

    >>> import torch, qcore
    >>> m = torch.export.export(torch.nn.Dropout(0.3), (torch.randn(4),)).module()
    >>> qcore.move_exported_model_to_eval(m).training
    False
    """
    set_training_mode(model, False)
    return model


def move_exported_model_to_train(model: GraphModule) -> GraphModule:
    """Make batch norm use batch statistics and dropout active, in place.

    >>> import torch, qcore
    >>> m = torch.export.export(torch.nn.Dropout(0.3), (torch.randn(4),)).module()
    >>> qcore.move_exported_model_to_train(m).training
    True
    """
    set_training_mode(model, True)
    return model


def lower(model: GraphModule, backend: str, example_inputs: Optional[tuple] = None) -> GraphModule:
    """Rewrite a converted q/dq model into ``backend``'s kernels with every plugin's lowering
    passes; returns a new GraphModule that runs eagerly.

    >>> import qcore
    >>> qcore.lower(None, backend="no-such-backend")
    Traceback (most recent call last):
    ...
    qcore.errors.UnknownBackendError: unknown backend 'no-such-backend'; installed backends: ...
    """
    manager = get_plugin_manager()
    manager.get_backend(backend)
    _check_exported(model, "lower")
    model, _ = copy_graph_module(model, copy_tensors=False)
    context = LoweringContext(backend=backend, example_inputs=tuple(example_inputs) if example_inputs is not None else None)
    for lowering_pass in manager.lowering_passes(backend):
        changed = lowering_pass.fn(model, context)
        context.applied.append((lowering_pass.name, bool(changed)))
        if changed:
            model.graph.lint()
            model.recompile()
    model.meta["qcore_lowered"] = {"backend": backend, "passes": list(context.applied), "counters": dict(context.counters)}
    return model


#: Inductor settings Dynamo itself reads while it traces (``freezing`` decides whether parameters
#: become constants): ``torch.compile(options=...)`` reaches Inductor only, so ``CompiledModel``
#: sets these around each call instead.
READ_BY_DYNAMO_WHILE_TRACING = frozenset({"freezing"})


class CompiledModel(torch.nn.Module):
    """What ``qcore.compile`` returns: the lowered model and its ``torch.compile`` wrapper.

    Each call runs without autograd and with ``settings`` (the Inductor settings Dynamo reads
    while it traces, such as ``freezing``) set for the duration of the call only, since any call
    may (re)compile; the previous global values are put back after every call. A call does only
    what differs from the caller's state: no ``no_grad`` context when autograd is already off, no
    switch of a setting that already has the backend's value (each switch costs microseconds).
    """

    compiled: Any  # the torch.compile wrapper, a plain attribute (set in __init__)

    def __init__(self, lowered: GraphModule, compiled: Any, settings: dict) -> None:
        super().__init__()
        self.lowered = lowered
        self.settings = dict(settings)
        object.__setattr__(self, "compiled", compiled)  # not a second registration of `lowered`

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._call_with_settings(args, kwargs)
        return self._call_with_settings(args, kwargs)

    def _call_with_settings(self, args: tuple, kwargs: dict) -> Any:
        from torch._inductor import config as inductor_config

        previous = []
        for key, value in self.settings.items():
            current = getattr(inductor_config, key)
            if current != value:
                previous.append((key, current))
                setattr(inductor_config, key, value)
        try:
            return self.compiled(*args, **kwargs)
        finally:
            for key, value in previous:
                setattr(inductor_config, key, value)


def compile(
    model: GraphModule,
    backend: str,
    example_inputs: Optional[tuple] = None,
    options: Optional[dict] = None,
    **compile_kwargs: Any,
) -> CompiledModel:
    """Lower a converted q/dq model with ``backend``'s passes (``qcore.lower``), then compile the
    lowered model with ``torch.compile``; returns a ``CompiledModel`` for inference.

    The backend's ``compile_options`` (Inductor settings, e.g. oneDNN's ``freezing`` and
    ``max_autotune``), updated by ``options``, apply to this model only: the ones Dynamo reads
    while tracing (``freezing``) are set around each call, the others go to Inductor through
    ``torch.compile(options=...)``. Global Inductor settings and a user's custom Inductor passes
    are left as they are, and qcore registers nothing in Inductor, so calling ``compile`` again is
    safe. ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``, ...); a ``mode``'s
    settings are merged under the backend's. With ``example_inputs`` the model is compiled now,
    on copies of them.

    >>> import qcore
    >>> qcore.compile(None, backend="no-such-backend")
    Traceback (most recent call last):
    ...
    qcore.errors.UnknownBackendError: unknown backend 'no-such-backend'; installed backends: ...
    """
    record = get_plugin_manager().get_backend(backend)
    from torch._inductor import config as inductor_config

    settings = {**record.compile_options, **(options or {})}
    unknown = sorted(key for key in settings if not hasattr(inductor_config, key))
    if unknown:
        raise ValueError(
            f"qcore.compile: unknown Inductor settings {unknown} (from backend {backend!r}'s "
            f"compile_options or options=); allowed: names in torch._inductor.config, e.g. 'freezing'"
        )
    lowered = lower(model, backend, example_inputs)
    per_call = {key: value for key, value in settings.items() if key in READ_BY_DYNAMO_WHILE_TRACING}
    at_compile = {key: value for key, value in settings.items() if key not in per_call}
    mode = compile_kwargs.pop("mode", None)
    if mode is not None:  # torch.compile takes a mode or options, not both: a mode is options
        at_compile = {**torch._inductor.list_mode_options(mode), **at_compile}
    if at_compile:
        compile_kwargs["options"] = at_compile
    compiled = CompiledModel(lowered, torch.compile(lowered, **compile_kwargs), per_call)
    if example_inputs is not None:
        compiled(*[t.clone() if isinstance(t, torch.Tensor) else t for t in example_inputs])
    return compiled
