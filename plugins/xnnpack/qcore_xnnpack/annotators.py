"""The XNNPACK annotators as ``qcore.Annotator`` records (what ``annotate_op`` returns).

qcore, not this list, decides the run order: longer fused patterns before their parts
(conv -> batch_norm -> relu, then conv -> relu, then conv), then the observer-sharing ops
(pools, cat), and ``propagate_annotation`` last (priority 0). Modes follow the seed's op
lists: ``linear`` is the only dynamic annotator; the conv -> batch_norm family runs only for
QAT configs; everything else runs for static PTQ and QAT configs.

>>> sorted(a.name for a in xnnpack_annotators())[:3]
['adaptive_avg_pool2d', 'add', 'add_relu']
"""

from __future__ import annotations

from typing import Callable

import qcore
from qcore_xnnpack import (
    annotate_binary,
    annotate_cat,
    annotate_conv,
    annotate_conv_bn,
    annotate_gru,
    annotate_linear,
    annotate_pool,
    propagate_annotation,
)

STATIC = frozenset({"static", "qat"})
STATIC_AND_DYNAMIC = frozenset({"static", "dynamic", "qat"})
QAT_ONLY = frozenset({"qat"})


def xnnpack_annotators() -> list[qcore.Annotator]:
    """Every annotator of the XNNPACK recipe."""

    def record(name: str, fn: Callable[..., list], pattern: tuple, modes: frozenset = STATIC, shares_input: bool = False) -> qcore.Annotator:
        # the pattern's length is the priority: fused patterns claim their nodes first
        return qcore.Annotator(name=name, fn=fn, priority=len(pattern), modes=modes, shares_input=shares_input)

    return [
        record("conv_bn_relu", annotate_conv_bn.annotate_conv_bn_relu, ("conv", "batch_norm", "relu"), QAT_ONLY),
        record("conv_bn", annotate_conv_bn.annotate_conv_bn, ("conv", "batch_norm"), QAT_ONLY),
        record("conv_transpose_bn_relu", annotate_conv_bn.annotate_conv_transpose_bn_relu, ("conv_transpose", "batch_norm", "relu"), QAT_ONLY),
        record("conv_transpose_bn", annotate_conv_bn.annotate_conv_transpose_bn, ("conv_transpose", "batch_norm"), QAT_ONLY),
        record("linear_relu", annotate_linear.annotate_linear_relu, ("linear", "relu")),
        record("linear", annotate_linear.annotate_linear, ("linear",), STATIC_AND_DYNAMIC),
        record("conv_relu", annotate_conv.annotate_conv_relu, ("conv", "relu")),
        record("conv", annotate_conv.annotate_conv, ("conv",)),
        record("conv_transpose_relu", annotate_conv.annotate_conv_transpose_relu, ("conv_transpose", "relu")),
        record("conv_transpose", annotate_conv.annotate_conv_transpose, ("conv_transpose",)),
        record("gru_io_only", annotate_gru.annotate_gru_io_only, ("gru",)),
        record("add_relu", annotate_binary.annotate_add_relu, ("add", "relu")),
        record("add", annotate_binary.annotate_add, ("add",)),
        record("mul_relu", annotate_binary.annotate_mul_relu, ("mul", "relu")),
        record("mul", annotate_binary.annotate_mul, ("mul",)),
        record("adaptive_avg_pool2d", annotate_pool.annotate_adaptive_avg_pool2d, ("adaptive_avg_pool2d",), shares_input=True),
        record("max_pool2d", annotate_pool.annotate_max_pool2d, ("max_pool2d",), shares_input=True),
        record("cat", annotate_cat.annotate_cat, ("cat",), shares_input=True),
        # empty pattern: sorts after every other sharing annotator, i.e. runs last.
        record("propagate_annotation", propagate_annotation.propagate_annotation, (), STATIC_AND_DYNAMIC, shares_input=True),
    ]
