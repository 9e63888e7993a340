"""The core's two accuracy algorithms as ``qcore.Algorithm`` records, registered through the
``qcore_register_algorithms`` hook by the core's plugin (``qcore.plugin``) like any plugin's.

>>> sorted(a.name for a in builtin_algorithms())
['bias_correction', 'smooth_quant']
"""

from __future__ import annotations

from typing import Any, Optional

from torch.fx import GraphModule

from qcore.records import Algorithm, AlgorithmContext

__all__ = ["builtin_algorithms"]


def _run_smooth_quant(model: GraphModule, value: Any, context: AlgorithmContext) -> GraphModule:
    from qcore.accuracy.smooth_quant import SMOOTH_QUANT_META, smooth_quant

    smoothed = smooth_quant(model, context.calibration, alpha=value)
    done = smoothed.meta.get(SMOOTH_QUANT_META, [])
    if done:
        parts = [
            f"{', '.join(r['consumers'])} (outliers {r['max_abs_before']:.1f}x -> {r['max_abs_after']:.1f}x the median channel, "
            f"1/s folded into {r['folded_into']})"
            for r in done
        ]
        context.note(f"smooth_quant alpha={value:g}: smoothed the input of {'; '.join(parts)}")
    else:
        context.note(f"smooth_quant alpha={value:g}: no linear/matmul input with a LayerNorm or linear to fold into; nothing changed")
    return smoothed


def _check_smooth_quant(value: Any) -> None:
    from qcore.accuracy.smooth_quant import check_alpha

    check_alpha(value)


def _run_bias_correction(model: GraphModule, value: Any, context: AlgorithmContext) -> Optional[GraphModule]:
    from qcore.accuracy.bias_correction import BIAS_CORRECTION_META, correct_bias

    if not value:
        return None
    corrected = correct_bias(model, context.float_model, context.calibration)
    done = corrected.meta.get(BIAS_CORRECTION_META, [])
    if done:
        largest = max(max(abs(v) for v in c["shift"]) for c in done)
        context.note(f"bias_correction: corrected {len(done)} biases ({', '.join(c['node'] for c in done)}); largest shift {largest:.3g}")
    else:
        context.note("bias_correction: no quantized conv/linear with a correctable bias")
    return corrected


def _check_bias_correction(value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"bias_correction must be True or False, got {value!r}")


def builtin_algorithms() -> list[Algorithm]:
    return [
        Algorithm(
            name="smooth_quant", stage="float", fn=_run_smooth_quant, check=_check_smooth_quant,
            description="SmoothQuant: migrate activation outliers into the next linear/matmul weights (value: alpha in (0, 1))",
        ),
        Algorithm(
            name="bias_correction", stage="converted", fn=_run_bias_correction, check=_check_bias_correction,
            description="move each quantized conv/linear's mean output error over the calibration batches into its bias",
        ),
    ]
