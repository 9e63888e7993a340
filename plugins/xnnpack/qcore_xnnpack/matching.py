"""Graph-structure predicates the XNNPACK annotators share.

torch 2.13 exports carry no ``source_fn_stack``, so the annotators never look at where a node
came from in Python: they match aten targets and how nodes connect (``relu`` whose first
argument is a ``linear`` with no other user, ``conv2d`` whose single user is ``batch_norm``).

Skip rules (seed spec section 2.5) live here too: already claimed, rejected by the scope
filter (evaluated on compute nodes only: weights carry no ``nn_module_stack`` and follow
their consumer), a one-element constant too large for the histogram observer, and inputs
that are not float32 tensors.

>>> import torch
>>> gm = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)).module()
>>> [n.name for n in gm.graph.nodes if is_call(n, LINEAR)]
['linear']
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import GraphModule, Node

from qcore.annotation import get_annotation, is_annotated
from qcore.spec import QuantizationConfig

aten = torch.ops.aten

FilterFn = Callable[[Node], bool]

LINEAR = (aten.linear.default,)
CONV = (aten.conv1d.default, aten.conv2d.default)
CONV_TRANSPOSE = (
    aten.conv_transpose1d.default,
    aten.conv_transpose1d,
    aten.conv_transpose2d.input,
    aten.conv_transpose2d,
)
#: the plain conv / conv_relu annotators take every rank and padding form ExecuTorch 1.5.1's
#: quantizer takes (conv3d and ``padding="same"`` among them); conv + batch norm stays 1-D/2-D,
#: the ranks the QAT fusion rewrites
CONV_ANY_RANK = CONV + (aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.default, aten.conv3d.padding)
CONV_TRANSPOSE_ANY_RANK = CONV_TRANSPOSE + (aten.conv_transpose3d.input, aten.conv_transpose3d)
BATCH_NORM = (aten.batch_norm.default,)
RELU = (aten.relu.default, aten.relu_.default)
ADD = (aten.add.Tensor, aten.add_.Tensor)
MUL = (aten.mul.Tensor, aten.mul_.Tensor)
CAT = (aten.cat.default,)
MAX_POOL2D = (aten.max_pool2d.default,)
ADAPTIVE_AVG_POOL2D = (aten.adaptive_avg_pool2d.default,)
GRU = (aten.gru.input,)

# torch.histc, which HistogramObserver uses, works up to this magnitude.
HISTC_UPPER_BOUND = 3.4028235e15


def is_call(node: Any, targets: Iterable[Any]) -> bool:
    """True if ``node`` is a ``call_function`` node calling one of ``targets``."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def only_user_is(node: Node, user: Node) -> bool:
    """True if ``user`` is the one and only user of ``node``."""
    return len(node.users) == 1 and next(iter(node.users)) is user


def accepted(filter_fn: Optional[FilterFn], nodes: Iterable[Optional[Node]]) -> bool:
    """True if ``filter_fn`` accepts every compute node of the partition (None accepts all).

    Weights, biases and placeholders are not asked: export gives them no module stack, so a
    module-name or module-type scope could never claim a fused partition if they were.
    """
    if filter_fn is None:
        return True
    return all(filter_fn(n) for n in nodes if n is not None and n.op == "call_function")


def ops_claimed(nodes: Iterable[Optional[Node]]) -> bool:
    """True if an annotator already claimed one of the partition's ops.

    Parameters (``get_attr`` weights and biases) are not asked: a module called at several sites
    shares its weight, and each call is its own partition (its weight edge is annotated on that
    call). ExecuTorch's annotators ask them too, and so skip every call of a shared conv after
    the first; that conv then reads an int8 input with a float weight, which XNNPACK's runtime
    refuses when the program is loaded (``Failed to create convolution node``).
    """
    return is_annotated([n for n in nodes if n is not None and n.op != "get_attr"])


def is_float32_tensor(node: Node) -> bool:
    """True if export recorded a float32 tensor as ``node``'s value."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def get_attr_value(model: GraphModule, target: str) -> Any:
    """The object a ``get_attr`` target names, following dotted submodule paths."""
    module_path, _, name = target.rpartition(".")
    owner = model.get_submodule(module_path) if module_path else model
    return getattr(owner, name)


def is_large_scalar(node: Node, model: GraphModule) -> bool:
    """True for a one-element constant whose magnitude the histogram observer cannot bin."""
    if node.op != "get_attr":
        return False
    try:
        value = get_attr_value(model, str(node.target))
    except AttributeError:
        return False
    return isinstance(value, torch.Tensor) and value.numel() == 1 and abs(value.item()) > HISTC_UPPER_BOUND


def quantizable_binary_inputs(node: Node, model: GraphModule) -> Optional[list[Node]]:
    """The Node operands of an add/mul, or None if one of them rules the op out.

    An operand that is a huge one-element constant, or not a float32 tensor, keeps the whole
    op in float. Literal operands (plain Python numbers) are simply not quantized.
    """
    inputs: list[Node] = []
    for arg in node.args[:2]:
        if not isinstance(arg, Node):
            continue
        if is_large_scalar(arg, model) or not is_float32_tensor(arg):
            return None
        if arg not in inputs:
            inputs.append(arg)
    return inputs


def output_is_claimed_with_spec(node: Any) -> bool:
    """True if ``node`` was claimed by an annotator that gave its output a spec."""
    if not isinstance(node, Node):
        return False
    annotation = get_annotation(node)
    return annotation is not None and annotation._annotated and annotation.output_qspec is not None


def is_dynamic_config(config: Optional[QuantizationConfig]) -> bool:
    """True if the config quantizes activations dynamically (only linear runs then)."""
    act = None if config is None else config.input_activation
    return bool(getattr(act, "is_dynamic", False))


def transposed_conv_weight_spec(spec: Any, conv: Node) -> Any:
    """Per-channel weight specs of a transposed conv quantize along axis 1 (output channels).

    A transposed conv stores its weight as (in, out / groups, k...), so the output-channel
    axis is 1; the config's axis 0 is right for every other op. Grouped transposed convs keep
    the config's spec unchanged.
    """
    import attrs

    if spec is None or getattr(spec, "qscheme", None) not in (torch.per_channel_symmetric, torch.per_channel_affine):
        return spec
    groups = _conv_transpose_groups(conv)
    if groups != 1:
        return spec
    return attrs.evolve(spec, ch_axis=1)


def _conv_transpose_groups(conv: Node) -> int:
    # conv_transpose{1,2}d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    if len(conv.args) > 6:
        return int(conv.args[6])
    return int(conv.kwargs.get("groups", 1))
