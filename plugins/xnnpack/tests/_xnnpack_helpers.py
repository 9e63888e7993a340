"""Helpers the xnnpack plugin tests share: export, annotate, quantize, count q/dq ops."""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.fx import GraphModule

import qcore
from qcore.annotation import ANNOTATION_KEY
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

CONFIG_KINDS = {
    "static": {},
    "per_channel": {"is_per_channel": True},
    "dynamic": {"is_dynamic": True},
    "qat": {"is_qat": True},
}


def config(kind: str = "static") -> qcore.QuantizationConfig:
    return get_symmetric_quantization_config(**CONFIG_KINDS[kind])


def quantizer(kind: str = "static") -> XNNPACKQuantizer:
    return XNNPACKQuantizer().set_global(config(kind))


def quantizer_with(**config_kwargs: Any) -> XNNPACKQuantizer:
    """A quantizer whose global config is ``get_symmetric_quantization_config(**config_kwargs)``."""
    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(**config_kwargs))


def export(model: torch.nn.Module, *inputs: Any, train: bool = False) -> GraphModule:
    model = model.train() if train else model.eval()
    return torch.export.export(model, inputs).module()


def annotate(model: torch.nn.Module, inputs: tuple, q: Any, train: bool = False) -> GraphModule:
    """Export, transform for annotation and annotate (no observers)."""
    gm = export(model, *inputs, train=train)
    gm = q.transform_for_annotation(gm)
    q.annotate(gm)
    return gm


def node(gm: GraphModule, name: str) -> torch.fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(f"no node {name!r}; nodes: {[n.name for n in gm.graph.nodes]}")


def annotation(gm: GraphModule, name: str) -> Any:
    return node(gm, name).meta.get(ANNOTATION_KEY)


def input_map(gm: GraphModule, name: str) -> dict:
    """{input node name: spec} of a node's annotation ({} if none)."""
    a = annotation(gm, name)
    return {} if a is None else {k.name: v for k, v in a.input_qspec_map.items()}


def quantize(model: torch.nn.Module, inputs: tuple, q: Any, is_qat: bool = False, batches: int = 2) -> GraphModule:
    """Export, prepare (PTQ or QAT), calibrate on a few random batches, convert."""
    torch.manual_seed(0)
    gm = export(model, *inputs, train=is_qat)
    prepared = qcore.prepare_qat_pt2e(gm, q) if is_qat else qcore.prepare_pt2e(gm, q)
    for _ in range(batches):
        prepared(*[torch.randn_like(t) for t in inputs])
    prepared(*inputs)
    if is_qat:
        prepared = qcore.move_exported_model_to_eval(prepared)
    return qcore.convert_pt2e(prepared)


def qdq_counts(gm: GraphModule) -> dict:
    """How many quantize / dequantize / choose_qparams calls the graph makes, by op (overloads summed).

    Keys: "q", "dq" (per tensor), "q_pc", "dq_pc" (per channel), "choose_qparams".
    """
    names = {
        "quantize_per_tensor": "q",
        "dequantize_per_tensor": "dq",
        "quantize_per_channel": "q_pc",
        "dequantize_per_channel": "dq_pc",
        "choose_qparams": "choose_qparams",
    }
    counts: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function" or not hasattr(n.target, "_schema"):
            continue
        ns, _, rest = n.target._schema.name.partition("::")
        if ns == "quantized_decomposed" and rest in names:
            counts[names[rest]] += 1
    return dict(counts)


def observer_nodes(gm: GraphModule) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("qcore_observer")]


def observer_instance(gm: GraphModule, n: torch.fx.Node) -> Any:
    return gm.get_submodule(n.target)
