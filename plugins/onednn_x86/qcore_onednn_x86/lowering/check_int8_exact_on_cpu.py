"""Warn when the program's int8 ranges are not exact on this CPU's oneDNN kernels (first pass).

A converted program records what it assumes of the CPU in its own quantize/dequantize ops: the
activation range (``quant_max`` of the uint8 dequantize feeding a conv/linear) and the weight
range (``quant_min``/``quant_max`` of the int8 per-channel dequantize). On a CPU without VNNI
or AMX, oneDNN adds pairs of u8 x s8 products in int16 with saturation, which is exact only when
``2 * activation_max * weight_abs_max <= 32767`` (``cpu_features.pair_sum_is_exact``). A
program made for a VNNI CPU (full 8-bit both) lowered here gets one warning line naming the
program's assumption and this CPU; lowering goes on (the program still runs)::

    dq(x: uint8 [0, 255]) ─▶ linear ◀─ dq_per_channel(w: int8 [-128, 127])
      on AVX2 without VNNI:  Int8SaturationWarning, graph unchanged

The graph is never changed. ``model.meta["qcore_target"]`` (set by ``qcore.quantize(target=...)``
and kept by save/load), when present, is named in the warning.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qcore.records import LoweringContext

from qcore_onednn_x86 import cpu_features
from qcore_onednn_x86.cpu_features import TARGET_CPUS, pair_sum_is_exact
from qcore_onednn_x86.lowering.graph_utils import DQ_PER_CHANNEL, VIEW_LIKE_OPS, act_dequantize, aten, is_call

NAME = "check_int8_exact_on_cpu"

WEIGHTED_OPS = (
    aten.linear.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.convolution.default,
    aten.addmm.default,
    aten.mm.default,
    aten.matmul.default,
    aten.bmm.default,
)


class Int8SaturationWarning(UserWarning):
    """The program's int8 ranges saturate in this CPU's oneDNN kernels: the lowered model loses accuracy."""


def _through_views(node: object) -> object:
    while isinstance(node, Node) and is_call(node, VIEW_LIKE_OPS):
        node = node.args[0]
    return node


def _weight_range(dq_weight: Node) -> Optional[tuple]:
    args = list(dq_weight.args) + [None] * 7
    quant_min, quant_max, dtype = args[4], args[5], args[6]
    if dtype != torch.int8 or not isinstance(quant_min, int) or not isinstance(quant_max, int):
        return None
    return quant_min, quant_max


def _activation_max(node: object) -> Optional[int]:
    params = act_dequantize(node)  # a uint8 per-tensor dequantize
    return params.quant_max if params is not None and isinstance(params.quant_max, int) else None


def int8_layer_ranges(model: GraphModule) -> list:
    """``(op node, activation_max, (weight_min, weight_max))`` of every conv/linear/matmul that
    reads a uint8 dequantized activation and an int8 per-channel dequantized weight."""
    found = []
    for op in model.graph.nodes:
        if op.op != "call_function" or op.target not in WEIGHTED_OPS:
            continue
        inputs = [_through_views(arg) for arg in op.args[:3]]
        weights = [_weight_range(n) for n in inputs if is_call(n, DQ_PER_CHANNEL)]
        activations = [_activation_max(n) for n in inputs]
        weight = next((w for w in weights if w is not None), None)
        activation = next((a for a in activations if a is not None), None)
        if weight is not None and activation is not None:
            found.append((op, activation, weight))
    return found


def check_int8_exact_on_cpu(model: GraphModule, context: LoweringContext) -> bool:
    """Warn (one line) if this CPU saturates the program's int8 layers; never changes the graph."""
    cpu = cpu_features.detect_cpu()
    if not cpu.int8_pair_sums_saturate:
        return False
    layers = int8_layer_ranges(model)
    inexact = [(op, a, w) for op, a, w in layers if not pair_sum_is_exact(a, max(abs(w[0]), abs(w[1])))]
    context.count("int8_layers_inexact_on_cpu", len(inexact))
    if not inexact:
        return False
    _, activation_max, (weight_min, weight_max) = inexact[0]
    target = model.meta.get("qcore_target")
    made_for = f"quantized for target {target!r}" if target in TARGET_CPUS else "quantized for a CPU with VNNI or AMX"
    warnings.warn(
        f"qcore onednn: this program was {made_for} ({len(inexact)} of {len(layers)} int8 layers use "
        f"activations [0, {activation_max}] x weights [{weight_min}, {weight_max}]), but this CPU is "
        f"{cpu.describe()}, so those layers lose accuracy once lowered; re-quantize with "
        f"default_config(target='avx2') (qcore quantize --target-cpu avx2) for a program exact here",
        Int8SaturationWarning,
        stacklevel=3,
    )
    return False
