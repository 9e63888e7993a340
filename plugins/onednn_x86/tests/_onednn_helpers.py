"""Shared helpers for the oneDNN x86 plugin tests: quantize a model with the x86 recipe,
lower it, count ops."""

from __future__ import annotations

from typing import Any, Optional

import torch

import qcore
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

qd = torch.ops.quantized_decomposed
onednn = torch.ops.onednn
aten = torch.ops.aten

QDQ_OPS = (
    qd.quantize_per_tensor.default,
    qd.quantize_per_tensor.tensor,
    qd.dequantize_per_tensor.default,
    qd.dequantize_per_tensor.tensor,
    qd.dequantize_per_channel.default,
)


def x86_quantizer(config: Any = None) -> X86InductorQuantizer:
    return X86InductorQuantizer().set_global(config or get_default_x86_inductor_quantization_config())


def export(model: torch.nn.Module, example: tuple) -> torch.fx.GraphModule:
    return torch.export.export(model.eval(), example).module()


def quantize(model: torch.nn.Module, example: tuple, quantizer: Any = None, batches: int = 3) -> torch.fx.GraphModule:
    """Export, prepare with the x86 recipe, calibrate on ``example`` and a few random batches,
    convert. Returns the converted q/dq GraphModule."""
    torch.manual_seed(0)
    prepared = qcore.prepare_pt2e(export(model, example), quantizer or x86_quantizer())
    for _ in range(batches):
        prepared(*[torch.randn_like(t) if t.is_floating_point() else t for t in example])
    prepared(*example)
    return qcore.convert_pt2e(prepared)


def lower(converted: torch.fx.GraphModule, example: tuple) -> torch.fx.GraphModule:
    return qcore.lower(converted, backend="onednn", example_inputs=example)


def calls(gm: torch.fx.GraphModule, *targets: Any) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def count(gm: torch.fx.GraphModule, *targets: Any) -> int:
    return len(calls(gm, *targets))


def qdq_count(gm: torch.fx.GraphModule) -> int:
    return count(gm, *QDQ_OPS)


def skip_range_clamp(node: Any) -> Any:
    """The producer behind the uint8 ``qcore_onednn.clamp_uint8(·, quant_max)`` that follows a oneDNN op whose
    fused output quantize has a narrow range ([0, 180]: the pair-safe config of CPUs without
    VNNI); ``node`` itself otherwise."""
    if getattr(node, "target", None) is torch.ops.qcore_onednn.clamp_uint8.default and node.args[1] < 255:
        return node.args[0]
    return node


def counters(lowered: torch.fx.GraphModule) -> dict:
    return lowered.meta["qcore_lowered"]["counters"]


def largest_activation_scale(converted: torch.fx.GraphModule) -> float:
    scales = [float(n.args[1]) for n in calls(converted, qd.quantize_per_tensor.default)]
    return max(scales) if scales else 0.0


def run_both(converted: torch.fx.GraphModule, lowered: torch.fx.GraphModule, example: tuple) -> tuple:
    with torch.no_grad():
        return converted(*example), lowered(*example)


def assert_close_to_reference(converted: torch.fx.GraphModule, lowered: torch.fx.GraphModule, example: tuple,
                              atol: Optional[float] = None) -> None:
    """The lowered model matches the q/dq model within one quantization step (or ``atol``)."""
    reference, actual = run_both(converted, lowered, example)
    tolerance = atol if atol is not None else largest_activation_scale(converted) * 1.01 + 1e-5
    diff = (reference - actual).abs().max().item()
    assert diff <= tolerance, f"lowered differs from the q/dq model by {diff} > {tolerance}"
