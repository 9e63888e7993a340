"""XNNPACK annotators for max_pool2d and adaptive_avg_pool2d: outputs share their input's observer.

max_pool2d, only when its producer's output is already quantized::

    conv ──[obs A]──▶ max_pool2d ──[Shared(conv) = obs A]──▶

adaptive_avg_pool2d, always: the input edge shares the producer's observer if the producer
is quantized, else gets its own activation spec; the output shares that input edge::

    prod ─[Shared(prod) or act]─▶ adaptive_avg_pool2d ──[Shared((prod, pool))]──▶

Both run after every compute annotator (``shares_input=True``), so the producer has had its
chance to be claimed. The max_pool2d annotation carries the input edge explicitly
(``{prod: Shared(prod)}``) as well as the output; the seed's accidental overwrite left only
the output, which inserts the same observers.
"""

from __future__ import annotations

from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.spec import QuantizationConfig, SharedQuantizationSpec, get_input_act_qspec
from qcore_xnnpack.matching import (
    ADAPTIVE_AVG_POOL2D,
    MAX_POOL2D,
    FilterFn,
    accepted,
    is_call,
    is_float32_tensor,
    output_is_claimed_with_spec,
)


def annotate_max_pool2d(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Share the producer's observer across every ``aten.max_pool2d`` whose producer is quantized."""
    partitions = []
    for pool in model.graph.nodes:
        if not is_call(pool, MAX_POOL2D) or is_annotated(pool) or not accepted(filter_fn, [pool]):
            continue
        producer = pool.args[0]
        if not output_is_claimed_with_spec(producer):
            continue
        shared = SharedQuantizationSpec(producer)
        annotate_input(pool, producer, shared)
        annotate_output(pool, shared)
        mark_annotated([pool])
        partitions.append([pool])
    return partitions


def annotate_adaptive_avg_pool2d(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Quantize every ``aten.adaptive_avg_pool2d``, its output sharing its input edge."""
    partitions = []
    for pool in model.graph.nodes:
        if not is_call(pool, ADAPTIVE_AVG_POOL2D) or is_annotated(pool) or not accepted(filter_fn, [pool]):
            continue
        producer = pool.args[0]
        if not isinstance(producer, Node) or not is_float32_tensor(producer):
            continue
        if output_is_claimed_with_spec(producer):
            input_spec = SharedQuantizationSpec(producer)
        else:
            input_spec = get_input_act_qspec(config)
        if input_spec is None:
            continue
        annotate_input(pool, producer, input_spec)
        annotate_output(pool, SharedQuantizationSpec((producer, pool)))
        mark_annotated([pool])
        partitions.append([pool])
    return partitions
