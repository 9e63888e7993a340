"""Rewrite quantized islands into the integer arithmetic an int8 kernel performs
(``convert_pt2e(..., use_reference_representation=True)``).

Before (static linear; ``w_q`` is an int8 constant, bias float)::

    x_q ──▶ dequantize_per_tensor(·, sx, zx, -128, 127, int8) ──▶ linear ──▶ quantize_per_tensor(·, so, zo, -128, 127, int8)
    w_q ──▶ dequantize_per_channel(·, sw, zw, 0, -127, 127, int8) ──┘   ▲
    b ──────────────────────────────────────────────────────────────────┘

After::

    x_q ──▶ to(int16) ──▶ sub(zx) ──▶ out_dtype(linear, int32, ·, ·, None) ──▶ add ──▶ mul(sx*sw/so) ──▶ round
    w_q ──▶ to(int16) ─────────────────────────┘                                 ▲
    b ──▶ div(sx*sw) ──▶ round ──▶ to(int32) ────────────────────────────────────┘
          ──▶ to(int32) ──▶ add(zo) ──▶ clamp(-128, 127) ──▶ to(int8)

Rewritten islands (the matchers and replacements live in
:mod:`qcore.passes.reference_patterns`):

* static ``linear`` and ``conv2d`` (8-bit per-tensor activation, int8 per-tensor or
  per-channel weight, float or int32 bias, optional ``relu`` before the output quantize; with
  no output quantize, as x86-style quantizers leave it, the int32 accumulator is scaled back to
  float);
* ``add`` and ``add -> relu`` of two 8-bit tensors (fixed point: ``out_dtype(mul, int32, ·, M)``
  per input, as torchao's add_relu reference, then one rounding shift);
* ``max_pool2d`` (computed on the 8-bit values, re-quantized only if the qparams change);
* dynamic ``linear`` (``choose_qparams`` still picks the activation qparams at run time; the
  product is integer, the output float).

Islands of other shapes keep their quantize/dequantize ops; the pass logs which. Boundary
quantize/dequantize ops (model input and output) are kept as they are. Counts of rewritten
islands are stored in ``model.meta["qcore_reference_representation"]``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch.fx import GraphModule, Node

from qcore.passes.qdq_ops import is_dequantize, is_quantize
from qcore.passes.reference_patterns import EMITTERS, MATCHERS, Emitter

log = logging.getLogger(__name__)

REFERENCE_META = "qcore_reference_representation"


def rewrite_to_reference_representation(model: GraphModule) -> bool:
    """Run the pass in place on a converted model; returns True if the graph changed."""
    graph = model.graph
    erased: set[Node] = set()
    counts: Counter = Counter()
    for anchor in list(graph.nodes):
        if anchor in erased or anchor.op != "call_function":
            continue
        match = next((m for m in (matcher(anchor) for matcher in MATCHERS) if m is not None), None)
        if match is None:
            continue
        emit = Emitter(model, anchor, where=anchor)
        result = EMITTERS[type(match)](emit, match)
        output = match.island[0]
        if "val" in output.meta:  # same shape and dtype as the island's output
            result.meta["val"] = output.meta["val"]
        output.replace_all_uses_with(result)
        for node in match.island:
            if not node.users:
                _erase(model, node, erased)
        counts[match.name] += 1
    _report_leftovers(graph)
    model.meta[REFERENCE_META] = dict(counts)
    if counts:
        graph.lint()
        model.recompile()
    return bool(counts)


def _erase(model: GraphModule, node: Node, erased: set[Node]) -> None:
    """Erase ``node``, then any constant it read that nothing else reads."""
    inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    model.graph.erase_node(node)
    erased.add(node)
    for constant in inputs:
        if constant.users or constant in erased:
            continue
        target = constant.target
        model.graph.erase_node(constant)
        erased.add(constant)
        if not any(n.op == "get_attr" and n.target == target for n in model.graph.nodes):
            _drop_attr(model, target)


def _drop_attr(model: GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner: Any = model.get_submodule(owner_path) if owner_path else model
    for table in (owner._parameters, owner._buffers):
        if name in table:
            del table[name]
            return


def _report_leftovers(graph: Any) -> None:
    """Log each op that still reads a dequantize and feeds a quantize (not rewritten)."""
    for node in graph.nodes:
        if node.op != "call_function" or is_quantize(node) or is_dequantize(node):
            continue
        reads_dq = any(is_dequantize(a) for a in node.all_input_nodes)
        feeds_q = any(is_quantize(u) for u in node.users)
        if reads_dq and feeds_q:
            log.info(
                "reference representation: %s (%s) keeps its quantize/dequantize ops; "
                "rewritten patterns: linear, conv2d (+relu, or float output), add, add_relu, "
                "max_pool2d, dynamic linear",
                node.name,
                node.target,
            )
