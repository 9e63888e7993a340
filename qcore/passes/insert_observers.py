"""Insert observers (PTQ) or fake-quantizers (QAT) where the annotations ask for them.

Before (``linear`` annotated: input and weight edges, and its output)::

    x ──▶ linear ◀── w
            │
            ▼
           out

After::

    x ──▶ obs_0 ──▶ linear ◀── obs_1 ◀── w
                      │
                      ▼
                    obs_2 ──▶ out

Every annotated point (a node's output, or an input edge ``producer -> consumer``) belongs to
one sharing group, and each group gets one observer instance. Groups come from
``SharedQuantizationSpec`` (resolved in any graph order, chains included) and from implicit
sharing: an input edge merges with the producer's output observer and with sibling edges when
their specs agree on dtype, range, scheme, axis and dynamism. A group's observer is built from
its first non-shared spec. Observer nodes are marked ``node.meta["qcore_observer"] = True``.

The model passed in is not changed; running the pass on an already prepared model returns it
unchanged.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Optional, Union, cast

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import ANNOTATION_KEY
from qcore.errors import PrepareError
from qcore.graph_copy import copy_graph_module
from qcore.passes.mutations import alias_root, buffer_names, is_buffer_destination, is_mutating_call, mutated_roots
from qcore.spec import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationSpec,
    SharedQuantizationSpec,
)

log = logging.getLogger(__name__)

OBSERVER_META = "qcore_observer"
PREPARED_META = "qcore_prepared"
OBSERVER_PREFIX = "activation_post_process_"

Point = Union[Node, tuple]


class QuantizationWarning(UserWarning):
    """Something was left in float because it could not be quantized."""


def insert_observers(
    model: GraphModule,
    is_qat: bool = False,
    obs_or_fq_callback: Optional[Callable[[GraphModule, dict], None]] = None,
    in_place: bool = False,
) -> GraphModule:
    """Return a copy of ``model`` with observers or fake-quantizers on every annotated point
    (``in_place=True``: rewrite ``model`` itself, for callers that own it).

    >>> import torch, qcore
    >>> from qcore.observers import MinMaxObserver
    >>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(4),)).module()
    >>> relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    >>> spec = qcore.QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=MinMaxObserver)
    >>> relu.meta["quantization_annotation"] = qcore.QuantizationAnnotation(output_qspec=spec)
    >>> prepared = insert_observers(gm)
    >>> sum(1 for n in prepared.graph.nodes if n.meta.get("qcore_observer"))
    1
    """
    if model.meta.get(PREPARED_META) or any(n.meta.get(OBSERVER_META) for n in model.graph.nodes):
        log.info("insert_observers: the model already has observers; returned unchanged")
        model.recompile()
        return model
    if not in_place:
        model, _ = copy_graph_module(model, copy_tensors=False, recompile=False)
    points = _collect_points(model)
    groups = _SharingGroups(points)
    groups.add_explicit_sharing()
    groups.add_implicit_sharing(model)
    instances = groups.create_instances(is_qat)
    if obs_or_fq_callback is not None:
        obs_or_fq_callback(model, instances)
    _insert(model, instances)
    model.meta[PREPARED_META] = {"is_qat": is_qat}
    model.graph.lint()
    model.recompile()
    return model


# ----------------------------------------------------------------------------- collecting
def _is_integer_value(node: Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.dtype.is_floating_point


def _describe(point: Point) -> str:
    if isinstance(point, Node):
        return f"output of node {point.name!r}"
    return f"input edge {point[0].name!r} -> {point[1].name!r}"


def _collect_points(model: GraphModule) -> dict[Point, Any]:
    """Every (point, spec) the annotations give, in graph order: inputs first, then output."""
    points: dict[Point, Any] = {}
    graph = model.graph
    for node in graph.nodes:
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is None:
            continue
        flat_args = _flat_nodes(node.args)
        kwarg_nodes = _flat_nodes(node.kwargs)
        has_spec = annotation.output_qspec is not None or any(s is not None for s in annotation.input_qspec_map.values())
        if has_spec and kwarg_nodes and not any(arg in kwarg_nodes for arg in annotation.input_qspec_map):
            # torchao's rule: a tensor keyword argument of a quantized op would go unobserved
            name = next(k for k, v in node.kwargs.items() if _flat_nodes(v))
            raise PrepareError(
                f"node {node.name!r} ({node.target}) is annotated for quantization and takes the tensor "
                f"{kwarg_nodes[0].name!r} as keyword argument {name!r}, which cannot be observed; pass "
                f"tensors positionally, or leave the op unannotated (non-tensor keyword arguments are fine)"
            )
        for arg, spec in annotation.input_qspec_map.items():
            if spec is None:
                continue
            if arg.graph is not graph:
                raise PrepareError(
                    f"the annotation of node {node.name!r} names input {arg.name!r}, which is not in this graph"
                )
            if arg not in flat_args:
                where = "a keyword argument" if arg in kwarg_nodes else "not an argument"
                raise PrepareError(
                    f"the annotation of node {node.name!r} gives a spec to input {arg.name!r}, which is "
                    f"{where} of that node; only positional tensor arguments can be observed"
                )
            if _is_integer_value(arg):
                warnings.warn(
                    f"input edge {arg.name!r} -> {node.name!r} carries an integer/bool tensor "
                    f"({arg.meta['val'].dtype}); it is not observed and stays as it is",
                    QuantizationWarning,
                    stacklevel=3,
                )
                continue
            points[(arg, node)] = spec
        spec = annotation.output_qspec
        if spec is None:
            continue
        val = node.meta.get("val")
        if node.op != "output" and isinstance(val, torch.Tensor):
            if not val.dtype.is_floating_point:
                warnings.warn(
                    f"output of node {node.name!r} is an integer/bool tensor ({val.dtype}); it is not "
                    f"observed and stays as it is",
                    QuantizationWarning,
                    stacklevel=3,
                )
                continue
            points[node] = spec
        elif node.op != "output" and val is None and node.op in ("call_function", "placeholder", "get_attr"):
            points[node] = spec
    return points


def _flat_nodes(value: Any) -> list[Node]:
    out: list[Node] = []
    if isinstance(value, Node):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            out.extend(_flat_nodes(item))
    elif isinstance(value, dict):
        for item in value.values():
            out.extend(_flat_nodes(item))
    return out


# ----------------------------------------------------------------------------- grouping
_COMPAT_ATTRS = ("dtype", "is_dynamic", "quant_min", "quant_max", "qscheme", "ch_axis", "scale", "zero_point")
_MISSING = object()


def _compatible(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    for attr in _COMPAT_ATTRS:
        va, vb = getattr(a, attr, _MISSING), getattr(b, attr, _MISSING)
        if (va is _MISSING) != (vb is _MISSING) or va != vb:
            return False
    return True


class _SharingGroups:
    """Union-find over annotated points; each root owns one observer."""

    def __init__(self, points: dict[Point, Any]) -> None:
        self.points = points
        self.order = {point: index for index, point in enumerate(points)}
        self.parent: dict[Point, Point] = {point: point for point in points}

    def find(self, point: Point) -> Point:
        root = point
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[point] != root:
            self.parent[point], point = root, self.parent[point]
        return root

    def union(self, a: Point, b: Point) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        # the group's root is its earliest point, so the earliest real spec defines the observer
        if self.order[root_a] <= self.order[root_b]:
            self.parent[root_b] = root_a
        else:
            self.parent[root_a] = root_b

    def _target(self, point: Point, spec: SharedQuantizationSpec) -> Point:
        target = spec.edge_or_node
        if target not in self.points:
            where = "is not in the graph" if _point_outside(target, point) else "has no quantization spec"
            raise PrepareError(
                f"the SharedQuantizationSpec of the {_describe(point)} points at the {_describe(target)}, "
                f"which {where}; a shared spec must name an annotated node output or input edge"
            )
        return target

    def add_explicit_sharing(self) -> None:
        for point, spec in self.points.items():
            if isinstance(spec, SharedQuantizationSpec):
                self.union(self._target(point, spec), point)
        self.group_spec: dict[Point, Any] = {}
        for point, spec in self.points.items():
            root = self.find(point)
            if root not in self.group_spec and not isinstance(spec, SharedQuantizationSpec):
                self.group_spec[root] = spec
        for point in self.points:
            if self.find(point) not in self.group_spec:
                raise PrepareError(
                    f"the {_describe(point)} only shares with points that themselves only share "
                    f"(a cycle of SharedQuantizationSpec); one point of the group needs a real spec"
                )

    def spec_of(self, point: Point) -> Any:
        return self.group_spec[self.find(point)]

    def _merge(self, a: Point, b: Point) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        spec_a, spec_b = self.group_spec[root_a], self.group_spec[root_b]
        self.union(a, b)
        root = self.find(a)
        self.group_spec[root] = spec_a if self.order[root_a] <= self.order[root_b] else spec_b

    def add_implicit_sharing(self, model: GraphModule) -> None:
        for point in list(self.points):
            if isinstance(point, Node):
                continue
            arg, node = point
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is None or not annotation.allow_implicit_sharing:
                continue
            spec = self.spec_of(point)
            for user in arg.users:
                sibling = (arg, user)
                if user is not node and sibling in self.points and _compatible(self.spec_of(sibling), spec):
                    self._merge(sibling, point)
            if arg in self.points and _compatible(self.spec_of(arg), spec):
                self._merge(arg, point)

    def create_instances(self, is_qat: bool) -> dict[Point, torch.nn.Module]:
        created: dict[Point, torch.nn.Module] = {}
        building: set[Point] = set()

        def instance_for(point: Point) -> torch.nn.Module:
            root = self.find(point)
            if root in created:
                return created[root]
            if root in building:
                raise PrepareError(f"the DerivedQuantizationSpec of the {_describe(point)} derives from itself")
            building.add(root)
            spec = self.group_spec[root]
            if isinstance(spec, DerivedQuantizationSpec):
                sources = []
                for source in spec.derived_from:
                    if source not in self.points:
                        raise PrepareError(
                            f"the DerivedQuantizationSpec of the {_describe(point)} derives from the "
                            f"{_describe(source)}, which has no quantization spec"
                        )
                    sources.append(instance_for(source))
                module = _derived_module(spec, sources)
            else:
                module = create_obs_or_fq(spec, is_qat)
                if spec.qscheme in _PER_CHANNEL and spec.ch_axis is None:
                    _warn_if_default_axis_is_wrong(module, [p for p in self.points if self.find(p) == root])
            setattr(module, "node_name", _describe(root))  # named in calibration and convert messages
            created[root] = module
            building.discard(root)
            return module

        return {point: instance_for(point) for point in self.points}


def _point_outside(target: Any, point: Point) -> bool:
    graph = point.graph if isinstance(point, Node) else point[1].graph
    nodes = [target] if isinstance(target, Node) else list(target)
    return any(n.graph is not graph for n in nodes)


# ----------------------------------------------------------------------------- creating
def _unwrap_ctor(ctor: Any) -> tuple[type, dict]:
    cls = getattr(ctor, "cls", None)
    if cls is not None:
        return cls, dict(getattr(ctor, "kwargs", {}))
    if hasattr(ctor, "p"):
        partial = ctor.p
        kwargs = dict(partial.keywords)
        func = partial.func
        while hasattr(func, "p"):
            kwargs = {**func.p.keywords, **kwargs}
            func = func.p.func
        return func, kwargs
    return ctor, {}


def _is_fake_quant_class(cls: type, kwargs: dict) -> bool:
    return "FakeQuant" in cls.__name__ or "observer" in kwargs


def create_obs_or_fq(spec: Any, is_qat: bool) -> torch.nn.Module:
    """Build the observer or fake-quantizer a spec asks for.

    The spec's constructor decides observer vs fake-quant (``is_qat`` does not change it), except
    for ``FixedQParamsQuantizationSpec``: an observer for PTQ, a fake-quantizer for QAT.
    """
    from qcore import observers

    kwargs: dict[str, Any]
    if isinstance(spec, FixedQParamsQuantizationSpec):
        kwargs = dict(
            scale=spec.scale,
            zero_point=spec.zero_point,
            dtype=spec.dtype,
            qscheme=spec.qscheme or torch.per_tensor_affine,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
        )
        if is_qat:
            return observers.FixedQParamsFakeQuantize(observer=observers.FixedQParamsObserver.with_args(**kwargs))
        return observers.FixedQParamsObserver(**kwargs)
    if not isinstance(spec, QuantizationSpec):
        raise PrepareError(f"cannot build an observer for {spec!r}")
    cls, _ = _unwrap_ctor(spec.observer_or_fake_quant_ctr)
    kwargs = {
        "dtype": spec.dtype,
        "quant_min": spec.quant_min,
        "quant_max": spec.quant_max,
        "is_dynamic": spec.is_dynamic,
    }
    if spec.qscheme is not None:
        kwargs["qscheme"] = spec.qscheme
    per_channel = spec.qscheme in (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
    if spec.ch_axis is not None and ("PerChannel" in cls.__name__ or (per_channel and "FakeQuant" in cls.__name__)):
        kwargs["ch_axis"] = spec.ch_axis
    try:
        return spec.observer_or_fake_quant_ctr(**kwargs)
    except TypeError as exc:
        raise PrepareError(
            f"observer class {cls.__name__} does not accept the spec's arguments "
            f"({', '.join(kwargs)}): {exc}"
        ) from exc


_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
_aten = torch.ops.aten
# the weight's output-channel dimension, by the op that reads it as its second argument
_WEIGHT_CHANNEL_AXIS = {
    _aten.conv_transpose1d.default: 1,
    _aten.conv_transpose2d.input: 1,
    _aten.conv_transpose3d.input: 1,
    _aten.conv1d.default: 0,
    _aten.conv2d.default: 0,
    _aten.conv3d.default: 0,
    _aten.linear.default: 0,
}


def _observer_axis(module: torch.nn.Module) -> Optional[int]:
    inner = getattr(module, "activation_post_process", module)  # a fake-quantizer's observer
    axis = getattr(module, "ch_axis", None)
    axis = getattr(inner, "ch_axis", axis) if axis in (None, -1) else axis
    return axis if isinstance(axis, int) else None


def _warn_if_default_axis_is_wrong(module: torch.nn.Module, points: list) -> None:
    """A per-channel spec without ``ch_axis`` takes the observer's default axis (torchao's rule);
    warn, naming the node, where a weight edge it observes has its channels on another axis."""
    axis = _observer_axis(module)
    for point in points:
        if not isinstance(point, tuple):
            continue
        arg, user = point
        expected = _WEIGHT_CHANNEL_AXIS.get(user.target) if user.op == "call_function" else None
        if expected is None or len(user.args) < 2 or user.args[1] is not arg or axis == expected:
            continue
        warnings.warn(
            f"the per-channel spec of the weight {arg.name!r} of {user.name!r} ({user.target}) gives no "
            f"ch_axis, so the observer's default axis {axis} applies; that op's weight has its output "
            f"channels on axis {expected}: give ch_axis={expected} in the QuantizationSpec",
            QuantizationWarning,
            stacklevel=2,
        )


def _derived_module(spec: DerivedQuantizationSpec, sources: list) -> torch.nn.Module:
    from qcore.observers import DerivedObserverOrFakeQuantize

    return DerivedObserverOrFakeQuantize(
        dtype=spec.dtype,
        obs_or_fqs=sources,
        derive_qparams_fn=spec.derive_qparams_fn,
        quant_min=spec.quant_min,
        quant_max=spec.quant_max,
        qscheme=spec.qscheme,
        ch_axis=spec.ch_axis,
    )


# ----------------------------------------------------------------------------- inserting
def is_observer_node(node: Node) -> bool:
    """True for an observer/fake-quant call inserted by qcore."""
    return node.op == "call_module" and bool(node.meta.get(OBSERVER_META))


class _Inserter:
    def __init__(self, model: GraphModule, instances: dict[Point, torch.nn.Module]) -> None:
        self.model = model
        self.instances = instances
        self.next_index = 0
        self.node_of_module: dict[int, list[Node]] = {}
        self.module_name: dict[int, str] = {}
        self.mutated = mutated_roots(model)  # storage some in-place op writes
        self._buffers: Optional[set[str]] = None

    @property
    def buffers(self) -> set[str]:
        if self._buffers is None:
            self._buffers = buffer_names(self.model)
        return self._buffers

    def _name_for(self, module: torch.nn.Module) -> str:
        while hasattr(self.model, f"{OBSERVER_PREFIX}{self.next_index}"):
            self.next_index += 1
        name = f"{OBSERVER_PREFIX}{self.next_index}"
        self.next_index += 1
        return name

    def insert_after(self, node: Node, module: torch.nn.Module, before: Optional[Node] = None) -> Node:
        name = self._name_for(module)
        self.model.add_module(name, module)
        with self.model.graph.inserting_after(node) if before is None else self.model.graph.inserting_before(before):
            observer = self.model.graph.call_module(name, (node,))
        observer.meta[OBSERVER_META] = True
        val = node.meta.get("val")
        if val is not None:
            observer.meta["val"] = val
        if "nn_module_stack" in node.meta:
            observer.meta["nn_module_stack"] = node.meta["nn_module_stack"]
        self.node_of_module.setdefault(id(module), []).append(observer)
        return observer

    def module_of(self, node: Node) -> Optional[torch.nn.Module]:
        if is_observer_node(node):
            return self.model.get_submodule(node.target)
        return None

    def input_for(self, arg: Node, node: Node) -> Node:
        original = arg
        while is_observer_node(original):
            original = cast(Node, original.args[0])  # an observer node's input is a node
        module = self.instances.get((original, node))
        if module is None:
            return arg
        if self.instances.get(original) is module:
            return arg
        if self.mutated and is_mutating_call(node) and is_buffer_destination(node, original, self.buffers):
            return arg  # the buffer an in-place op writes: observing it would write into a copy
        if self.mutated and alias_root(original) in self.mutated:
            # written in place somewhere: observe (and later quantize) the value this node reads,
            # right before it, not the value at the producer
            return self.insert_after(arg, module, before=node)
        for user in arg.users:
            if self.module_of(user) is module:
                return user
        return self.insert_after(arg, module)

    def map_args(self, value: Any, node: Node) -> Any:
        if isinstance(value, Node):
            return self.input_for(value, node)
        if isinstance(value, (list, tuple)):
            return type(value)(self.map_args(item, node) for item in value)
        return value


def _insert(model: GraphModule, instances: dict[Point, torch.nn.Module]) -> None:
    inserter = _Inserter(model, instances)
    for node in list(model.graph.nodes):
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is None:
            continue
        if annotation.input_qspec_map:
            node.args = inserter.map_args(node.args, node)
        module = instances.get(node)
        if module is not None:
            observer = inserter.insert_after(node, module)
            for user in list(node.users):
                if user is not observer:
                    user.replace_input_with(node, observer)
