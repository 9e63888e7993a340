"""The hooks a qcore plugin can implement, and the one marker plugin authors import.

A plugin is a module named by an entry point in the group ``qcore``; it holds functions marked
with ``@qcore.hookimpl`` whose names are the hook names below::

    # my_backend/plugin.py
    import qcore

    @qcore.hookimpl
    def qcore_register_backends():
        return [qcore.Backend(name="mybackend", quantizer_class=MyQuantizer)]

    @qcore.hookimpl
    def annotate_op(backend):
        if backend == "mybackend":
            return [qcore.Annotator(name="sigmoid", fn=annotate_sigmoid)]
        return []

qcore calls every hook through pluggy, so an implementation may take fewer arguments than its
spec (``def annotate_op():`` is fine) and hook wrappers apply. The order in which records take
effect is qcore's, not pluggy's: annotators by priority (fused patterns before their parts),
lowering passes by their declared ``after``, QAT fusions with the core's default first and then
by plugin name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import pluggy

if TYPE_CHECKING:
    from torch.fx import GraphModule

    from qcore.records import Algorithm, Annotator, Backend, LoweringPass

PROJECT = "qcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qcore_register_backends() -> "list[Backend]":
    """Declare the backends this plugin provides.

    Returns:
        A list of :class:`qcore.Backend` records (name, quantizer class, description,
        availability check). Two plugins declaring the same backend name is an error.

    Example::

        @qcore.hookimpl
        def qcore_register_backends():
            return [qcore.Backend(name="xnnpack", quantizer_class=XNNPACKQuantizer,
                                  description="int8 for ExecuTorch's XNNPACK delegate")]
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this


@hookspec
def annotate_op(backend: str) -> "list[Annotator]":
    """Contribute op annotators for ``backend``.

    Args:
        backend: the backend name the model is being quantized for (``"xnnpack"``, ...).

    Returns:
        A list of :class:`qcore.Annotator` records for ``backend`` only (empty or None if this
        plugin has nothing for it): the argument is how annotators are selected. qcore runs every annotator of every plugin in its own order:
        fused patterns before their parts, observer-sharing ops last. An annotator may add
        annotations but never change or remove one an earlier annotator made.

    Example::

        @qcore.hookimpl
        def annotate_op(backend):
            if backend == "xnnpack":
                return [qcore.Annotator(name="sub", fn=annotate_sub)]
            return []
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this


@hookspec
def fuse_qat(model: "GraphModule", is_qat: bool) -> Optional[bool]:
    """Rewrite an annotated graph into its quantization-aware-training form (conv-bn fusion).

    Called after annotation and before observer insertion, only when preparing for QAT.
    Every implementation runs: the core's default first, then the others by plugin name.

    Args:
        model: the annotated ``torch.fx.GraphModule``, rewritten in place.
        is_qat: always True today (the argument keeps the door open for PTQ-time fusions).

    Returns:
        True if the graph was changed, False or None if not.

    Example::

        @qcore.hookimpl
        def fuse_qat(model, is_qat):
            return fuse_my_conv_norm(model)
    """


@hookspec(firstresult=True)
def insert_observers(
    model: "GraphModule", is_qat: bool, obs_or_fq_callback: "Optional[Callable[[GraphModule, dict], None]]"
) -> "Optional[GraphModule]":
    """Insert observers (PTQ) or fake-quantizers (QAT) on every annotated edge and output.

    The first implementation that returns a model decides; the core's default implementation
    is registered ``trylast``, so a plugin replaces it by returning a model and extends it by
    returning None after doing its own preparation.

    Args:
        model: the annotated ``torch.fx.GraphModule`` (qcore's own copy of the user's model:
            rewrite it in place or return a new one).
        is_qat: whether the model is prepared for training.
        obs_or_fq_callback: the quantizer's ``prepare_obs_or_fq_callback`` (or None): called
            once every observer is created, with the model and a dict
            ``{edge or node: observer instance}``, so the quantizer can adjust them (tie two
            observers together, set a range) before calibration.

    Returns:
        The prepared ``GraphModule``, or None to let the next implementation decide.

    Example::

        @qcore.hookimpl(tryfirst=True)
        def insert_observers(model, is_qat, obs_or_fq_callback):
            if model.meta.get("my_backend"):
                prepared = my_insert_observers(model, is_qat)
                if obs_or_fq_callback is not None:
                    obs_or_fq_callback(prepared, my_observers_by_edge(prepared))
                return prepared
    """


@hookspec
def lower_pattern(backend: str) -> "list[LoweringPass]":
    """Contribute lowering passes that rewrite converted q/dq patterns into backend kernels.

    Args:
        backend: the backend being lowered to (``"onednn"``, ...).

    Returns:
        A list of :class:`qcore.LoweringPass` records for ``backend`` only. qcore runs every
        pass of every plugin for that backend, ordered by their ``after`` declarations (ties by name).

    Example::

        @qcore.hookimpl
        def lower_pattern(backend):
            if backend == "onednn":
                return [qcore.LoweringPass(name="fuse_my_op", fn=fuse_my_op,
                                           after=("prepack_weights",))]
            return []
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this


@hookspec
def qcore_register_algorithms() -> "list[Algorithm]":
    """Declare accuracy algorithms that ``qcore.quantize`` can run around calibration.

    ``qcore.quantize(..., algorithms={name: value})`` runs the algorithm named ``name`` with
    ``value`` (``smooth_quant=0.5`` and ``bias_correction=True`` are the core's own two,
    registered through this hook like any plugin's). A ``"float"`` algorithm rewrites qcore's
    copy of the exported float graph before annotation (SmoothQuant); a ``"converted"`` one
    rewrites the converted q/dq program before lowering (bias correction). Two plugins
    declaring the same name is an error naming both.

    Returns:
        A list of :class:`qcore.Algorithm` records: ``fn(model, value, context)`` returns the
        rewritten ``GraphModule`` (or None after rewriting ``model`` in place); ``context`` is a
        :class:`qcore.AlgorithmContext` (backend, calibration batches, the float model,
        ``note(text)`` for the report).

    Example::

        @qcore.hookimpl
        def qcore_register_algorithms():
            return [qcore.Algorithm(name="clip_weights", stage="float", fn=clip_weights,
                                    description="clip each weight to 3 standard deviations")]
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations, never this
