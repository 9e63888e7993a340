"""The core's own hook implementations, loaded like any plugin (name ``qcore``): observer
insertion, the QAT conv-bn fusion and the built-in ``reference`` backend (``qcore.reference``)."""

from __future__ import annotations

from typing import Any

from qcore.hookspecs import hookimpl


@hookimpl(trylast=True)
def insert_observers(model: Any, is_qat: bool, obs_or_fq_callback: Any) -> Any:
    from qcore.passes.insert_observers import insert_observers as insert

    # prepare_pt2e hands the hook its own copy of the user's model: rewrite it in place
    return insert(model, is_qat=is_qat, obs_or_fq_callback=obs_or_fq_callback, in_place=True)


@hookimpl
def fuse_qat(model: Any, is_qat: bool) -> bool:
    from qcore.passes.fuse_conv_bn_qat import fuse_conv_bn_qat

    return fuse_conv_bn_qat(model) if is_qat else False


@hookimpl
def qcore_register_backends() -> list:
    from qcore.records import Backend
    from qcore.reference import ReferenceQuantizer

    return [
        Backend(
            name="reference",
            quantizer_class=ReferenceQuantizer,
            description="built into qcore: int8 linear and conv, kept as the reference q/dq program (no lowering)",
        )
    ]


@hookimpl
def annotate_op(backend: str) -> list:
    if backend != "reference":
        return []
    from qcore.reference.annotators import reference_annotators

    return reference_annotators()


@hookimpl
def qcore_register_algorithms() -> list:
    from qcore.accuracy.plugin import builtin_algorithms

    return builtin_algorithms()
