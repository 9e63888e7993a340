"""Helpers annotators use: read, add and claim annotations, scope filters, and the guard
that stops a later annotator from changing what an earlier one decided.

>>> import torch
>>> gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2),)).module()
>>> relu = next(n for n in gm.graph.nodes if n.op == "call_function")
>>> is_annotated(relu)
False
>>> mark_annotated([relu]); is_annotated(relu)
True
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.errors import AnnotationConflictError
from qcore.spec import QuantizationAnnotation, QuantizationSpecBase

ANNOTATION_KEY = "quantization_annotation"

FilterFn = Callable[[Node], bool]


def get_annotation(node: Node) -> Optional[QuantizationAnnotation]:
    """The node's annotation, or None."""
    return node.meta.get(ANNOTATION_KEY)


def _get_or_create(node: Node) -> QuantizationAnnotation:
    annotation = node.meta.get(ANNOTATION_KEY)
    if annotation is None:
        annotation = QuantizationAnnotation()
        node.meta[ANNOTATION_KEY] = annotation
    return annotation


def annotate_input(node: Node, input_node: Node, spec: Optional[QuantizationSpecBase]) -> None:
    """Set the spec of the edge ``input_node -> node`` (None: explicitly not quantized)."""
    _get_or_create(node).input_qspec_map[input_node] = spec


def annotate_output(node: Node, spec: Optional[QuantizationSpecBase]) -> None:
    """Set the spec of ``node``'s output."""
    _get_or_create(node).output_qspec = spec


def is_annotated(nodes: Node | Iterable[Optional[Node]]) -> bool:
    """True if any of the nodes has been claimed by an annotator."""
    if isinstance(nodes, Node):
        nodes = [nodes]
    for node in nodes:
        if node is None:
            continue
        annotation = node.meta.get(ANNOTATION_KEY)
        if annotation is not None and annotation._annotated:
            return True
    return False


def mark_annotated(nodes: Iterable[Optional[Node]]) -> None:
    """Claim the nodes (an empty annotation is created where there is none)."""
    for node in nodes:
        if node is not None:
            _get_or_create(node)._annotated = True


KEPT_FLOAT_KEY = "qcore_kept_float"


def keep_float(node: Node, reason: str) -> None:
    """Record that the backend leaves ``node`` in float on purpose, and why (reports show it).

    Nothing is claimed: a later annotator may still quantize the node, and then the note is moot.
    """
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"keep_float needs a non-empty reason string, got {reason!r}")
    node.meta[KEPT_FLOAT_KEY] = reason


def kept_float_reason(node: Node) -> Optional[str]:
    """The reason a backend gave with ``keep_float`` for ``node``, or None."""
    return node.meta.get(KEPT_FLOAT_KEY)


def has_output_spec(node: Any) -> bool:
    """True if ``node`` is a Node whose annotation gives its output a spec."""
    if not isinstance(node, Node):
        return False
    annotation = node.meta.get(ANNOTATION_KEY)
    return annotation is not None and annotation.output_qspec is not None


# ----------------------------------------------------------------------------- scope filters
def _module_stack(node: Node) -> Optional[dict]:
    return node.meta.get("nn_module_stack")


def _normalize_path(path: str) -> str:
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _type_name(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    return f"{cls.__module__}.{cls.__qualname__}"


def module_name_filter(name: str) -> FilterFn:
    """Accept nodes created inside the module at path ``name`` (any enclosing module counts).

    Nodes that are not calls (weights, placeholders) are accepted: their consumer decides.
    """

    def accept(node: Node) -> bool:
        if node.op != "call_function":
            return True
        stack = _module_stack(node) or {}
        return any(_normalize_path(path) == name for path, _ in stack.values())

    accept.__name__ = f"module_name_filter({name!r})"
    return accept


def module_type_filter(module_type: type) -> FilterFn:
    """Accept nodes created inside a module of class ``module_type``."""
    wanted = _type_name(module_type)

    def accept(node: Node) -> bool:
        if node.op != "call_function":
            return True
        stack = _module_stack(node) or {}
        return any(_type_name(cls) == wanted for _, cls in stack.values())

    accept.__name__ = f"module_type_filter({wanted})"
    return accept


def _calls_op(node: Node, op: Any) -> bool:
    target = node.target
    return target is op or getattr(target, "overloadpacket", None) is op


def operator_type_filter(op: Any, strict: bool = False) -> FilterFn:
    """Accept nodes of the patterns anchored at ``op`` (``aten.conv2d.default`` or its packet).

    A compute node is accepted if it calls ``op``, or (unless ``strict``) if it is not itself a
    quantizable anchor op (conv, linear, add, ...): the relu of a conv-relu partition follows
    its conv. Nodes that are not calls (weights, placeholders) are accepted: their consumer
    decides.
    """
    from qcore.coverage import QUANTIZABLE_OPS

    def accept(node: Node) -> bool:
        if node.op != "call_function":
            return True
        if _calls_op(node, op):
            return True
        return not strict and node.target not in QUANTIZABLE_OPS

    accept.__name__ = f"operator_type_filter({op})"
    return accept


def calls_operator_filter(op: Any) -> FilterFn:
    """Accept exactly the call nodes of ``op`` (used to keep them out of the global scope)."""

    def accept(node: Node) -> bool:
        return node.op == "call_function" and _calls_op(node, op)

    accept.__name__ = f"calls_operator_filter({op})"
    return accept


def not_any_filter(filters: list[FilterFn]) -> FilterFn:
    """Accept compute nodes that none of ``filters`` claims (the global scope)."""

    def accept(node: Node) -> bool:
        if node.op != "call_function":
            return True
        return not any(f(node) for f in filters)

    accept.__name__ = "global_scope_filter"
    return accept


# ----------------------------------------------------------------------------- the guard
class AnnotationSnapshot:
    """What every annotated node looked like before an annotator ran.

    The snapshot is one flat list (node, annotation, claimed, implicit sharing, output spec,
    number of input specs, then each input node and spec), so taking it allocates almost
    nothing however many nodes are annotated; the check compares by identity first.
    """

    def __init__(self, model: GraphModule) -> None:
        entries: list[Any] = []
        append = entries.append
        for node in model.graph.nodes:
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is not None:
                inputs = annotation.input_qspec_map
                append(node)
                append(annotation)
                append(annotation._annotated)
                append(annotation.allow_implicit_sharing)
                append(annotation.output_qspec)
                append(len(inputs))
                for item in inputs.items():
                    entries.extend(item)
        self.entries = entries

    def check_only_added(self, who: str) -> None:
        """Raise if an earlier annotation was changed or removed; ``who`` names the annotator."""
        entries = self.entries
        index, size = 0, len(entries)
        while index < size:
            node, old, claimed, sharing, output, input_count = entries[index : index + 6]
            inputs_at = index + 6
            index = inputs_at + 2 * input_count
            current = node.meta.get(ANNOTATION_KEY)
            if (
                current is old
                and current._annotated is claimed
                and current.allow_implicit_sharing is sharing
                and current.output_qspec is output
                and _same_inputs(current.input_qspec_map, entries, inputs_at, input_count)
            ):
                continue  # untouched (or only added to)
            problem = None
            if node.graph is None or current is None:
                problem = "removed the annotation"
            else:
                current_inputs = current.input_qspec_map
                for at in range(inputs_at, index, 2):
                    key, spec = entries[at], entries[at + 1]
                    if key not in current_inputs:
                        problem = f"removed the spec of input {key.name!r}"
                        break
                    if not _same_spec(current_inputs[key], spec):
                        problem = f"changed the spec of input {key.name!r}"
                        break
                if problem is None and output is not None and not _same_spec(current.output_qspec, output):
                    problem = "changed the output spec"
                if problem is None and claimed and not current._annotated:
                    problem = "un-claimed the node"
                if problem is None and sharing != current.allow_implicit_sharing and (input_count or output is not None):
                    problem = "changed allow_implicit_sharing"
            if problem is not None:
                raise AnnotationConflictError(
                    f"{who} {problem} of node {node.name!r}, which an earlier annotator had set; "
                    f"annotators may add annotations but never change or remove earlier ones"
                )


def _same_inputs(current: dict, entries: list, first: int, count: int) -> bool:
    """True if ``current`` still maps every recorded input node to the very same spec object."""
    if len(current) < count:
        return False
    get = current.get
    for at in range(first, first + 2 * count, 2):
        if get(entries[at], _MISSING) is not entries[at + 1]:
            return False
    return True


_MISSING = object()


def _same_spec(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def run_guarded(who: str, model: GraphModule, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (which annotates ``model``) and check it only added annotations."""
    snapshot = AnnotationSnapshot(model)
    result = fn()
    snapshot.check_only_added(who)
    return result


def node_val(node: Any) -> Any:
    """The example value (a FakeTensor, usually) export recorded for ``node``, or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def is_float_tensor_node(node: Any) -> bool:
    """True if ``node`` produces a single floating-point tensor."""
    val = node_val(node)
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point
