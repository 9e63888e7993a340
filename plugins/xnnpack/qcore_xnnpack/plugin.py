"""The qcore hook implementations of the XNNPACK backend (logic lives beside this file)."""

from __future__ import annotations

import qcore


@qcore.hookimpl
def qcore_register_backends() -> list:
    from qcore_xnnpack.quantizer import XNNPACKQuantizer

    return [
        qcore.Backend(
            name="xnnpack",
            quantizer_class=XNNPACKQuantizer,
            description="int8 for ExecuTorch's XNNPACK delegate (int8 per-tensor activations, "
            "int8 symmetric per-tensor or per-channel weights, static, dynamic and QAT)",
            preference=10,
            kernel_library="XNNPACK",
            lowered_runs_in_process=False,  # the lowered program is an ExecuTorch .pte
        )
    ]


@qcore.hookimpl
def annotate_op(backend: str) -> list:
    if backend != "xnnpack":
        return []
    from qcore_xnnpack.annotators import xnnpack_annotators

    return xnnpack_annotators()


@qcore.hookimpl
def lower_pattern(backend: str) -> list:
    if backend != "xnnpack":
        return []
    from qcore_xnnpack.lower_to_executorch import executorch_unavailable_reason, lower_to_executorch_pass

    if executorch_unavailable_reason() is not None:
        return []
    return [qcore.LoweringPass(name="lower_to_executorch", fn=lower_to_executorch_pass)]
