"""The qcore hook implementations of the oneDNN x86 backend (logic lives beside this file)."""

from __future__ import annotations

import qcore


@qcore.hookimpl
def qcore_register_backends() -> list:
    from qcore_onednn_x86.availability import onednn_unavailable_reason
    from qcore_onednn_x86.cpu_features import hardware_facts
    from qcore_onednn_x86.quantizer import X86InductorQuantizer

    return [
        qcore.Backend(
            name="onednn",
            quantizer_class=X86InductorQuantizer,
            description="x86 int8 (uint8 activations, int8 per-channel weights) lowered to oneDNN kernels",
            is_available=onednn_unavailable_reason,
            hardware=hardware_facts,
            preference=20,  # where it runs, commands that pick a backend pick this one
            kernel_library="oneDNN",
            compile_options={
                # oneDNN's packed weights must be graph constants for Inductor's lowerings
                "freezing": True,
                # each int8 GEMM runs the faster of oneDNN's kernel and Inductor's VNNI/AMX one,
                # timed at compile time; the timing tables are not printed
                "max_autotune": True,
                "autotune_num_choices_displayed": 0,
                "max_autotune_report_choices_stats": False,
                # the compiled model's host code in C++: no Python dispatch per oneDNN call
                "cpp_wrapper": True,
            },
        )
    ]


@qcore.hookimpl
def annotate_op(backend: str) -> list:
    if backend != "onednn":
        return []
    from qcore_onednn_x86.annotators import x86_annotators

    return x86_annotators()


@qcore.hookimpl
def lower_pattern(backend: str) -> list:
    if backend != "onednn":
        return []
    from qcore_onednn_x86.lowering import onednn_lowering_passes

    return onednn_lowering_passes()
