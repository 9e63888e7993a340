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
        return [qcore.Annotator(name="sigmoid", pattern=("sigmoid",), fn=annotate_sigmoid)]

The order in which implementations run is qcore's, not pluggy's: annotators by pattern
(fused patterns before their parts), lowering passes by their declared ``after``, QAT fusions
with the core's default first and then by plugin name.
"""

from __future__ import annotations

from typing import Any, Optional

import pluggy

PROJECT = "qcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qcore_register_backends() -> list:
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


@hookspec
def annotate_op(backend: str) -> list:
    """Contribute op annotators for ``backend``.

    Args:
        backend: the backend name the model is being quantized for (``"xnnpack"``, ...).

    Returns:
        A list of :class:`qcore.Annotator` records (empty or None if this plugin has nothing
        for that backend). qcore runs every annotator of every plugin in its own order:
        fused patterns before their parts, observer-sharing ops last. An annotator may add
        annotations but never change or remove one an earlier annotator made.

    Example::

        @qcore.hookimpl
        def annotate_op(backend):
            if backend == "xnnpack":
                return [qcore.Annotator(name="sub", pattern=("sub",), fn=annotate_sub)]
    """


@hookspec
def fuse_qat(model: Any, is_qat: bool) -> Optional[bool]:
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
def insert_observers(model: Any, is_qat: bool) -> Any:
    """Insert observers (PTQ) or fake-quantizers (QAT) on every annotated edge and output.

    The first implementation that returns a model decides; the core's default implementation
    is registered ``trylast``, so a plugin replaces it by returning a model and extends it by
    returning None after doing its own preparation.

    Args:
        model: the annotated ``torch.fx.GraphModule`` (qcore's own copy of the user's model:
            rewrite it in place or return a new one).
        is_qat: whether the model is prepared for training.

    Returns:
        The prepared ``GraphModule``, or None to let the next implementation decide.

    Example::

        @qcore.hookimpl(tryfirst=True)
        def insert_observers(model, is_qat):
            if model.meta.get("my_backend"):
                return my_insert_observers(model, is_qat)
    """


@hookspec
def lower_pattern(backend: str) -> list:
    """Contribute lowering passes that rewrite converted q/dq patterns into backend kernels.

    Args:
        backend: the backend being lowered to (``"onednn"``, ...).

    Returns:
        A list of :class:`qcore.LoweringPass` records. qcore runs every pass of every plugin
        for that backend, ordered by their ``after`` declarations (ties by name).

    Example::

        @qcore.hookimpl
        def lower_pattern(backend):
            if backend == "onednn":
                return [qcore.LoweringPass(name="fuse_my_op", backend="onednn",
                                           fn=fuse_my_op, after=("prepack_weights",))]
    """
