"""x86 annotator for (adaptive_)avg_pool2d: the recipe keeps average pools in float, and says why.

Nothing is quantized here; the pool's consumer quantizes the average with its own observer::

    conv ──▶ [q/dq] ──▶ adaptive_avg_pool2d (float) ──▶ flatten ──▶ [obs B] ──▶ linear

Sharing the input's observer (the old recipe) requantizes the average on the input's grid,
whose step is set by the largest activations while the average has a far narrower range: 0.9 dB
of SQNR on the bench ResNet-style CNN. The node is marked with ``qcore.annotation.keep_float``
so that reports and ``qcore explain`` give this reason instead of "no pattern matched".
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import keep_float
from qcore.spec import QuantizationConfig

from qcore_onednn_x86.annotators.common import FilterFn, is_call, should_skip

AVG_POOL_OPS = (torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.avg_pool2d.default)
AVG_POOL_FLOAT_REASON = (
    "an average has a narrower range than its input; its consumer quantizes it with its own "
    "observer (sharing the input's observer costs SQNR)"
)


def keep_avg_pool2d_float(model: GraphModule, config: QuantizationConfig, filter_fn: FilterFn) -> list[list[Node]]:
    """Mark every in-scope average pool as kept float on purpose; claims nothing."""
    if config is None:
        return []
    for node in model.graph.nodes:
        if is_call(node, AVG_POOL_OPS) and not should_skip([node], filter_fn):
            keep_float(node, AVG_POOL_FLOAT_REASON)
    return []
