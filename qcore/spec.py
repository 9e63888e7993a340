"""The data model: how an annotator says what to quantize and how.

Names and fields follow the old ``torch.ao.quantization.quantizer`` classes so that code written
for ``prepare_pt2e`` ports by changing imports. Every class validates on construction and the
message says what is wrong and what is allowed.

>>> import torch
>>> from qcore.observers import MinMaxObserver
>>> spec = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=MinMaxObserver,
...                         quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
>>> spec.dtype
torch.int8
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import attrs
import torch
from torch.fx import Node

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_QSCHEMES",
    "QuantizationSpecBase",
    "QuantizationSpec",
    "FixedQParamsQuantizationSpec",
    "SharedQuantizationSpec",
    "DerivedQuantizationSpec",
    "QuantizationAnnotation",
    "QuantizationConfig",
    "EdgeOrNode",
    "dtype_range",
    "ctor_key",
]

SUPPORTED_DTYPES = (
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float16,
    torch.float32,
)
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)
#: float8 is quantized like an integer dtype over ``int(finfo.min) .. int(finfo.max)``
#: (``quantize_per_tensor`` rounds, clamps and casts), so it takes a range and a qscheme.
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
QUANTIZED_DTYPES = INTEGER_DTYPES + FLOAT8_DTYPES
SUPPORTED_QSCHEMES = (
    torch.per_tensor_affine,
    torch.per_tensor_symmetric,
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)
PER_CHANNEL_QSCHEMES = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)

EdgeOrNode = Union[Node, "tuple[Node, Node]"]


def _names(items: tuple) -> str:
    return ", ".join(str(i).replace("torch.", "torch.") for i in items)


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    """The (min, max) integer range of an integer dtype (of float8: ``int(finfo)``).

    >>> dtype_range(torch.uint8), dtype_range(torch.float8_e5m2)
    ((0, 255), (-57344, 57344))
    """
    if dtype in FLOAT8_DTYPES:
        finfo = torch.finfo(dtype)
        return int(finfo.min), int(finfo.max)
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def ctor_key(ctor: Any) -> Any:
    """A value key for an observer constructor, so that equal configs compare equal.

    A class is its own key; a ``with_args`` wrapper (qcore's or torch.ao's) is keyed by
    (class, sorted keyword arguments).
    """
    cls = getattr(ctor, "cls", None)
    kwargs = getattr(ctor, "kwargs", None)
    if cls is None and hasattr(ctor, "p"):  # torch.ao _PartialWrapper
        partial = ctor.p
        cls, kwargs = partial.func, dict(partial.keywords)
        while hasattr(cls, "p"):
            inner = cls.p
            kwargs = {**inner.keywords, **kwargs}
            cls = inner.func
    if cls is None:
        return ctor
    return (cls, tuple(sorted((k, _hashable(v)) for k, v in (kwargs or {}).items())))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.flatten().tolist()))
    if hasattr(value, "p") or hasattr(value, "kwargs"):
        return ctor_key(value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _check_int_range(inst: Any, dtype: torch.dtype, quant_min: Any, quant_max: Any) -> None:
    cls = type(inst).__name__
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{cls}: {name} must be an int or None, got {value!r}")
    if quant_min is not None and quant_max is not None and quant_min > quant_max:
        raise ValueError(
            f"{cls}: quant_min ({quant_min}) must be <= quant_max ({quant_max})"
        )
    if dtype in QUANTIZED_DTYPES:
        low, high = dtype_range(dtype)
        for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
            if value is not None and not low <= value <= high:
                raise ValueError(
                    f"{cls}: {name}={value} is outside the range of {dtype}; "
                    f"allowed: {low} .. {high}"
                )
    elif quant_min is not None or quant_max is not None:
        raise ValueError(
            f"{cls}: quant_min/quant_max only apply to integer and float8 dtypes "
            f"({_names(QUANTIZED_DTYPES)}); {dtype} takes neither"
        )


def _check_dtype(inst: Any, dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        hint = ""
        if dtype in (torch.quint8, torch.qint8, torch.qint32):
            hint = " (use the plain dtype, e.g. torch.uint8 for torch.quint8)"
        raise TypeError(
            f"{type(inst).__name__}: unsupported dtype {dtype!r}{hint}; "
            f"allowed: {_names(SUPPORTED_DTYPES)}"
        )


def _check_qscheme(inst: Any, dtype: torch.dtype, qscheme: Any, ch_axis: Any, needs_axis: bool = True) -> None:
    cls = type(inst).__name__
    if qscheme is not None and qscheme not in SUPPORTED_QSCHEMES:
        raise ValueError(
            f"{cls}: unsupported qscheme {qscheme!r}; allowed: {_names(SUPPORTED_QSCHEMES)}"
        )
    if qscheme is not None and dtype not in QUANTIZED_DTYPES:
        raise ValueError(
            f"{cls}: qscheme {qscheme} needs an integer or float8 dtype ({_names(QUANTIZED_DTYPES)}); "
            f"{dtype} takes qscheme=None"
        )
    if ch_axis is not None and (isinstance(ch_axis, bool) or not isinstance(ch_axis, int)):
        raise TypeError(f"{cls}: ch_axis must be a non-negative int or None, got {ch_axis!r}")
    if ch_axis is not None and ch_axis < 0:
        raise ValueError(
            f"{cls}: ch_axis={ch_axis} is negative; give the channel dimension as a "
            f"non-negative index (e.g. 0 for conv/linear weights)"
        )
    if needs_axis and qscheme in PER_CHANNEL_QSCHEMES and ch_axis is None:
        raise ValueError(
            f"{cls}: per-channel qscheme {qscheme} needs ch_axis (the channel dimension, "
            f"e.g. 0 for conv/linear weights)"
        )


class QuantizationSpecBase:
    """Marker base class of every spec kind."""

    __slots__ = ()


@attrs.frozen(slots=False)
class QuantizationSpec(QuantizationSpecBase):
    """How to quantize one tensor: dtype, range, scheme and the observer that picks qparams."""

    dtype: torch.dtype
    observer_or_fake_quant_ctr: Callable[..., torch.nn.Module] = attrs.field(eq=ctor_key)
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None
    qscheme: Optional[torch.qscheme] = None
    ch_axis: Optional[int] = None
    is_dynamic: bool = False

    def __attrs_post_init__(self) -> None:
        _check_dtype(self, self.dtype)
        if not callable(self.observer_or_fake_quant_ctr):
            raise TypeError(
                "QuantizationSpec: observer_or_fake_quant_ctr must be an observer or "
                "fake-quantize class (or its .with_args(...)), got "
                f"{self.observer_or_fake_quant_ctr!r}"
            )
        _check_int_range(self, self.dtype, self.quant_min, self.quant_max)
        # a per-channel spec without ch_axis takes its observer's default axis (0 for qcore's and
        # torch.ao's per-channel observers), as torchao's prepare does; prepare warns where that
        # axis is not the op's channel axis (a transposed conv's weight is axis 1)
        _check_qscheme(self, self.dtype, self.qscheme, self.ch_axis, needs_axis=False)
        if not isinstance(self.is_dynamic, bool):
            raise TypeError(f"QuantizationSpec: is_dynamic must be True or False, got {self.is_dynamic!r}")
        if self.is_dynamic and self.dtype in FLOAT8_DTYPES:
            raise ValueError(
                f"QuantizationSpec: is_dynamic=True with {self.dtype}: choose_qparams computes "
                f"integer qparams only; allowed dynamic dtypes: {torch.uint8}, {torch.int8}"
            )
        if self.is_dynamic and self.qscheme in PER_CHANNEL_QSCHEMES:
            raise ValueError(
                "QuantizationSpec: is_dynamic=True is for activations, which are quantized "
                f"per tensor; allowed qschemes: {torch.per_tensor_affine}, {torch.per_tensor_symmetric}"
            )


@attrs.frozen(slots=False)
class FixedQParamsQuantizationSpec(QuantizationSpecBase):
    """An output with a mathematically fixed range (sigmoid, tanh): scale and zero point given."""

    dtype: torch.dtype
    scale: float
    zero_point: int
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None
    qscheme: Optional[torch.qscheme] = None

    def __attrs_post_init__(self) -> None:
        _check_dtype(self, self.dtype)
        if self.dtype not in INTEGER_DTYPES:
            raise TypeError(
                f"FixedQParamsQuantizationSpec: dtype must be an integer dtype "
                f"({_names(INTEGER_DTYPES)}), got {self.dtype}"
            )
        _check_int_range(self, self.dtype, self.quant_min, self.quant_max)
        _check_qscheme(self, self.dtype, self.qscheme, None)
        if self.qscheme in PER_CHANNEL_QSCHEMES:
            raise ValueError("FixedQParamsQuantizationSpec: qscheme must be per-tensor")
        if not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise ValueError(f"FixedQParamsQuantizationSpec: scale must be a positive float, got {self.scale!r}")
        if isinstance(self.zero_point, bool) or not isinstance(self.zero_point, int):
            raise TypeError(f"FixedQParamsQuantizationSpec: zero_point must be an int, got {self.zero_point!r}")
        low, high = dtype_range(self.dtype)
        low = self.quant_min if self.quant_min is not None else low
        high = self.quant_max if self.quant_max is not None else high
        if not low <= self.zero_point <= high:
            raise ValueError(
                f"FixedQParamsQuantizationSpec: zero_point={self.zero_point} is outside the "
                f"quantized range; allowed: {low} .. {high}"
            )


def _check_edge_or_node(owner: str, value: Any) -> None:
    if isinstance(value, Node):
        return
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], Node)
        and isinstance(value[1], Node)
    ):
        return
    raise TypeError(
        f"{owner}: expected a Node (a node's output) or a (producer, consumer) pair of Nodes "
        f"(an input edge), got {value!r}"
    )


@attrs.frozen(slots=False)
class SharedQuantizationSpec(QuantizationSpecBase):
    """Use the very same observer as another edge or node (same scale and zero point)."""

    edge_or_node: Any

    def __attrs_post_init__(self) -> None:
        _check_edge_or_node("SharedQuantizationSpec", self.edge_or_node)


@attrs.frozen(slots=False)
class DerivedQuantizationSpec(QuantizationSpecBase):
    """Qparams computed from other observers, e.g. bias scale = input scale x weight scale."""

    derived_from: list = attrs.field(converter=list, eq=attrs.cmp_using(eq=lambda a, b: a == b))
    derive_qparams_fn: Callable[[list], tuple[torch.Tensor, torch.Tensor]]
    dtype: torch.dtype
    quant_min: Optional[int] = None
    quant_max: Optional[int] = None
    qscheme: Optional[torch.qscheme] = None
    ch_axis: Optional[int] = None

    def __attrs_post_init__(self) -> None:
        if not self.derived_from:
            raise ValueError("DerivedQuantizationSpec: derived_from is empty; list the edges or nodes to derive from")
        for item in self.derived_from:
            _check_edge_or_node("DerivedQuantizationSpec.derived_from", item)
        if not callable(self.derive_qparams_fn):
            raise TypeError(
                "DerivedQuantizationSpec: derive_qparams_fn must be callable "
                "(list of observers -> (scale, zero_point))"
            )
        _check_dtype(self, self.dtype)
        _check_int_range(self, self.dtype, self.quant_min, self.quant_max)
        _check_qscheme(self, self.dtype, self.qscheme, self.ch_axis)

    def __hash__(self) -> int:
        return hash((tuple(self.derived_from), self.derive_qparams_fn, self.dtype))


def _check_optional_spec(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, QuantizationSpecBase):
        raise TypeError(
            f"{type(inst).__name__}.{attribute.name} must be a QuantizationSpec, "
            f"FixedQParamsQuantizationSpec, SharedQuantizationSpec, DerivedQuantizationSpec "
            f"or None, got {value!r}"
        )


def _check_input_map(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, dict):
        raise TypeError(f"QuantizationAnnotation.input_qspec_map must be a dict Node -> spec, got {value!r}")
    for key, spec in value.items():
        if not isinstance(key, Node):
            raise TypeError(f"QuantizationAnnotation.input_qspec_map keys must be Nodes, got {key!r}")
        _check_optional_spec(inst, attribute, spec)


@attrs.define(eq=False)
class QuantizationAnnotation:
    """What an annotator decided for one node, stored in ``node.meta["quantization_annotation"]``.

    ``input_qspec_map`` maps argument nodes to the spec of that input edge (None: not quantized),
    ``output_qspec`` is the spec of the node's output. ``_annotated`` marks the node as claimed.
    ``allow_implicit_sharing=False`` keeps the node's input edges out of implicit observer
    sharing. ``_is_output_of_quantized_pattern`` marks the last node of a quantized fused pattern
    (set by the x86 annotators, as torchao's ``_X86InductorQuantizationAnnotation`` does; read
    by their observer-sharing ops and by users' code).
    """

    input_qspec_map: dict = attrs.field(factory=dict, validator=_check_input_map)
    output_qspec: Optional[QuantizationSpecBase] = attrs.field(default=None, validator=_check_optional_spec)
    allow_implicit_sharing: bool = True
    _annotated: bool = attrs.field(default=False, alias="_annotated")
    _is_output_of_quantized_pattern: bool = attrs.field(default=False, alias="_is_output_of_quantized_pattern")


@attrs.frozen(slots=False)
class QuantizationConfig:
    """The specs a backend applies to one op pattern: input/output activation, weight, bias."""

    input_activation: Optional[QuantizationSpec] = attrs.field(default=None, validator=_check_optional_spec)
    output_activation: Optional[QuantizationSpec] = attrs.field(default=None, validator=_check_optional_spec)
    weight: Optional[QuantizationSpec] = attrs.field(default=None, validator=_check_optional_spec)
    bias: Optional[QuantizationSpec] = attrs.field(default=None, validator=_check_optional_spec)
    is_qat: bool = False

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.is_qat, bool):
            raise TypeError(f"QuantizationConfig: is_qat must be True or False, got {self.is_qat!r}")


_ACTIVATION_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_WEIGHT_QSCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def get_input_act_qspec(config: Optional[QuantizationConfig]) -> Optional[QuantizationSpec]:
    """The config's input activation spec (None if absent); activations are per tensor."""
    spec = None if config is None else config.input_activation
    _check_activation(spec, "input_activation")
    return spec


def get_output_act_qspec(config: Optional[QuantizationConfig]) -> Optional[QuantizationSpec]:
    """The config's output activation spec (None if absent); activations are per tensor."""
    spec = None if config is None else config.output_activation
    _check_activation(spec, "output_activation")
    return spec


def _check_activation(spec: Optional[QuantizationSpec], field: str) -> None:
    if isinstance(spec, QuantizationSpec) and spec.qscheme not in _ACTIVATION_QSCHEMES:
        raise ValueError(
            f"QuantizationConfig.{field}: qscheme {spec.qscheme} is not supported for "
            f"activations; allowed: {_names(_ACTIVATION_QSCHEMES)}"
        )


def get_weight_qspec(config: Optional[QuantizationConfig]) -> Optional[QuantizationSpec]:
    """The config's weight spec (None if absent); weights are symmetric."""
    spec = None if config is None else config.weight
    # a float16/float32 weight spec (a cast, torchao's linear_dynamic_fp16) has no qscheme
    cast = isinstance(spec, QuantizationSpec) and spec.qscheme is None and spec.dtype not in QUANTIZED_DTYPES
    if isinstance(spec, QuantizationSpec) and spec.qscheme not in _WEIGHT_QSCHEMES and not cast:
        raise ValueError(
            f"QuantizationConfig.weight: qscheme {spec.qscheme} is not supported for weights; "
            f"allowed: {_names(_WEIGHT_QSCHEMES)}"
        )
    return spec


def get_bias_qspec(config: Optional[QuantizationConfig]) -> Optional[QuantizationSpecBase]:
    """The config's bias spec (None if absent)."""
    return None if config is None else config.bias
