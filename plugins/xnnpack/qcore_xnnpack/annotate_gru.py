"""XNNPACK annotator ``gru_io_only``: quantize a GRU's inputs and outputs, run the GRU in float.

On torch 2.13 an ``nn.GRU`` exports as one ``aten.gru.input`` node whose results are read
with ``getitem``::

    x ─[act]─▶ gru.input ◀─[act]─ h0          weights: not quantized
                  │
          getitem 0 ──[act]──▶  (output sequence)
          getitem 1 ──[act]──▶  (final hidden state)

Both the input and the initial hidden state are quantized (the seed, written for a
decomposed GRU, annotated each input's first user and on this graph kept only one of them).
A GRU whose input or hidden state is not a float32 tensor stays float.
"""

from __future__ import annotations

import operator
from typing import Optional

from torch.fx import GraphModule, Node

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.spec import QuantizationConfig, get_input_act_qspec, get_output_act_qspec
from qcore_xnnpack.matching import GRU, FilterFn, accepted, is_call, is_float32_tensor


def _result_getters(gru: Node) -> list[Node]:
    return [
        user
        for user in gru.users
        if user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)
    ]


def annotate_gru_io_only(model: GraphModule, config: Optional[QuantizationConfig], filter_fn: Optional[FilterFn] = None) -> list[list[Node]]:
    """Annotate the input, hidden state and both results of every ``aten.gru.input``."""
    partitions = []
    for gru in model.graph.nodes:
        if not is_call(gru, GRU):
            continue
        x, h0 = gru.args[0], gru.args[1]
        if not all(isinstance(n, Node) and is_float32_tensor(n) for n in (x, h0)):
            continue
        outputs = _result_getters(gru)
        partition = [gru] + outputs
        if is_annotated(partition) or not accepted(filter_fn, partition):
            continue
        annotate_input(gru, x, get_input_act_qspec(config))
        if h0 is not x:
            annotate_input(gru, h0, get_input_act_qspec(config))
        for output in outputs:
            annotate_output(output, get_output_act_qspec(config))
        mark_annotated(partition)
        partitions.append(partition)
    return partitions
