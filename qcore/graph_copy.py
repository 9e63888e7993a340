"""Copy an exported GraphModule so qcore never mutates the user's model.

The graph is copied node by node (metadata dicts shallow-copied, example values shared); the
annotations are rebuilt on the new nodes, so every ``input_qspec_map`` key and every node a
``SharedQuantizationSpec`` or ``DerivedQuantizationSpec`` names points into the copy.
Annotations made with another library's spec classes (torchao's) are read by their fields and
become qcore's classes here.

>>> import torch
>>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
>>> new, node_map = copy_graph_module(gm)
>>> new is gm, len(node_map) == len(gm.graph.nodes)
(False, True)
"""

from __future__ import annotations

import copy
from typing import Any, Optional, cast

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import Argument

from qcore.annotation import ANNOTATION_KEY
from qcore.graph_attrs import attr_value
from qcore.spec import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    SharedQuantizationSpec,
)

_OWN_SPECS = (QuantizationSpec, FixedQParamsQuantizationSpec, SharedQuantizationSpec, DerivedQuantizationSpec)


def copy_graph_module(
    gm: GraphModule, copy_tensors: bool = True, recompile: bool = True
) -> tuple[GraphModule, dict[Node, Node]]:
    """A new GraphModule with its own graph and module tree (and its own tensors if
    ``copy_tensors``). Returns the copy and the map from old nodes to new nodes.

    Submodule containers are copied without re-running ``__init__`` (fast on deep models).
    With ``recompile=False`` the caller must call ``recompile()`` before running the copy.
    """
    graph, node_map = _copy_graph(gm.graph)
    cloned: dict[int, Any] = {}
    new = GraphModule(torch.nn.Module(), Graph(), class_name="GraphModule")
    new._parameters = {k: _maybe_clone(v, copy_tensors, cloned) for k, v in gm._parameters.items()}
    new._buffers = {k: _maybe_clone(v, copy_tensors, cloned) for k, v in gm._buffers.items()}
    new._non_persistent_buffers_set = set(getattr(gm, "_non_persistent_buffers_set", ()))
    new._modules = {k: _copy_module_tree(v, copy_tensors, cloned) for k, v in gm._modules.items()}
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_attr_path(new, node.target):
            value = attr_value(gm, node.target)
            _set_attr_path(new, node.target, _maybe_clone(value, copy_tensors, cloned))
    new.meta.update(getattr(gm, "meta", {}))
    new.training = gm.training
    new._graph = graph
    graph.owning_module = new
    remap_annotations(new, node_map)
    if recompile:
        new.recompile()
    return new, node_map


def _maybe_clone(value: Any, copy_tensors: bool, cloned: dict[int, Any]) -> Any:
    if copy_tensors and isinstance(value, torch.Tensor):
        return _clone_tensor(value, cloned)
    return value


def _copy_module_tree(module: Any, copy_tensors: bool, cloned: dict[int, Any]) -> Any:
    """Copy a module's containers (not its __init__): own dicts, shared or cloned tensors."""
    if module is None:
        return None
    if not copy_tensors and not module._modules and not module._parameters and not module._buffers:
        return module
    if id(module) in cloned:
        return cloned[id(module)]
    new = object.__new__(type(module))
    cloned[id(module)] = new
    new.__dict__ = module.__dict__.copy()
    new._parameters = {k: _maybe_clone(v, copy_tensors, cloned) for k, v in module._parameters.items()}
    new._buffers = {k: _maybe_clone(v, copy_tensors, cloned) for k, v in module._buffers.items()}
    new._modules = {k: _copy_module_tree(v, copy_tensors, cloned) for k, v in module._modules.items()}
    return new


def _has_attr_path(module: Any, target: str) -> bool:
    value = module
    for atom in target.split("."):
        if not hasattr(value, atom):
            return False
        value = getattr(value, atom)
    return True


def _copy_graph(old: Graph) -> tuple[Graph, dict[Node, Node]]:
    graph = Graph(tracer_cls=old._tracer_cls)
    node_map: dict[Node, Node] = {}
    # torch's annotation (Argument | None) leaves out the (value, output node) pair return_output_node=True gives
    copied = graph.graph_copy(old, val_map=node_map, return_output_node=True)
    output_val, old_output = cast("tuple[Argument, Node]", copied)
    graph._codegen = copy.copy(old._codegen)
    new_output = graph.output(output_val, type_expr=getattr(old_output, "type", None))
    new_output.meta = copy.copy(old_output.meta)
    node_map[old_output] = new_output
    return graph, node_map


def _set_attr_path(root: torch.nn.Module, target: str, value: Any, is_buffer: bool = False) -> None:
    *path, name = target.split(".")
    owner = root
    for atom in path:
        if not hasattr(owner, atom):
            owner.add_module(atom, torch.nn.Module())
        owner = getattr(owner, atom)
    if is_buffer and isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
        owner.register_buffer(name, value)
    else:
        setattr(owner, name, value)


def _clone_tensor(value: torch.Tensor, cloned: dict[int, Any]) -> torch.Tensor:
    key = id(value)
    if key not in cloned:
        if isinstance(value, torch.nn.Parameter):
            cloned[key] = torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        else:
            cloned[key] = value.detach().clone()
    return cloned[key]


# ----------------------------------------------------------------------------- annotations
def remap_annotations(gm: GraphModule, node_map: Optional[dict[Node, Node]] = None) -> None:
    """Rebuild every annotation of ``gm`` with qcore classes and keys mapped by ``node_map``."""
    node_map = node_map or {}
    for node in gm.graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is None:
            continue
        node.meta = dict(node.meta)
        node.meta[ANNOTATION_KEY] = convert_annotation(annotation, node_map)


def _map_node(value: Any, node_map: dict[Node, Node]) -> Any:
    if isinstance(value, Node):
        return node_map.get(value, value)
    if isinstance(value, tuple) and len(value) == 2:
        return (_map_node(value[0], node_map), _map_node(value[1], node_map))
    return value


def convert_spec(spec: Any, node_map: Optional[dict[Node, Node]] = None) -> Any:
    """A spec as a qcore spec, its node references mapped; foreign classes read by field name."""
    node_map = node_map or {}
    if spec is None:
        return None
    kind = type(spec).__name__
    if kind == "SharedQuantizationSpec":
        mapped = _map_node(spec.edge_or_node, node_map)
        if isinstance(spec, SharedQuantizationSpec) and mapped is spec.edge_or_node:
            return spec
        return SharedQuantizationSpec(mapped)
    if kind == "DerivedQuantizationSpec":
        derived_from = [_map_node(item, node_map) for item in spec.derived_from]
        if isinstance(spec, DerivedQuantizationSpec) and all(a is b for a, b in zip(derived_from, spec.derived_from)):
            return spec
        return DerivedQuantizationSpec(
            derived_from=derived_from,
            derive_qparams_fn=spec.derive_qparams_fn,
            dtype=spec.dtype,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
            qscheme=spec.qscheme,
            ch_axis=getattr(spec, "ch_axis", None),
        )
    if isinstance(spec, _OWN_SPECS):
        return spec
    if kind == "FixedQParamsQuantizationSpec":
        return FixedQParamsQuantizationSpec(
            dtype=spec.dtype,
            scale=spec.scale,
            zero_point=spec.zero_point,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
            qscheme=spec.qscheme,
        )
    if kind == "QuantizationSpec" or hasattr(spec, "observer_or_fake_quant_ctr"):
        return QuantizationSpec(
            dtype=spec.dtype,
            observer_or_fake_quant_ctr=spec.observer_or_fake_quant_ctr,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
            qscheme=spec.qscheme,
            ch_axis=spec.ch_axis,
            is_dynamic=spec.is_dynamic,
        )
    raise TypeError(
        f"unsupported quantization spec {spec!r} ({type(spec).__module__}.{kind}); expected "
        f"QuantizationSpec, FixedQParamsQuantizationSpec, SharedQuantizationSpec or "
        f"DerivedQuantizationSpec (qcore's or torchao's)"
    )


def convert_annotation(annotation: Any, node_map: Optional[dict[Node, Node]] = None) -> QuantizationAnnotation:
    """An annotation as a fresh qcore annotation with mapped keys and specs."""
    node_map = node_map or {}
    return QuantizationAnnotation(
        input_qspec_map={
            node_map.get(key, key): convert_spec(spec, node_map) for key, spec in annotation.input_qspec_map.items()
        },
        output_qspec=convert_spec(annotation.output_qspec, node_map),
        allow_implicit_sharing=getattr(annotation, "allow_implicit_sharing", True),
        _annotated=getattr(annotation, "_annotated", False),
        _is_output_of_quantized_pattern=getattr(annotation, "_is_output_of_quantized_pattern", False),
    )
