"""Observer base classes, ``with_args`` constructors and the shared scale/zero-point math.

Every qcore observer and fake-quantizer derives from :class:`ObserverOrFakeQuantizeBase`, which
gives it ``with_args``, ``node_name`` (set by the engine when the module is inserted, used in
error messages) and a helpful error for unknown constructor arguments. The uniform observers
(min-max, moving average, per-channel, histogram) derive from :class:`ObserverBase`, which
resolves ``quant_min``/``quant_max`` and computes qparams from a min/max pair exactly the way
``torch.ao.quantization.observer.UniformQuantizationObserverBase`` does.

>>> from qcore.observers import MinMaxObserver
>>> ctor = MinMaxObserver.with_args(eps=2**-12).with_args(dtype=torch.int8)
>>> ctor == MinMaxObserver.with_args(dtype=torch.int8, eps=2**-12)
True
>>> obs = ctor()
>>> _ = obs(torch.tensor([-1.0, 2.0]))
>>> obs.calculate_qparams()
(tensor([0.0118]), tensor([-43], dtype=torch.int32))
"""

from __future__ import annotations

import inspect
import math
import struct
import warnings
from typing import Any, Optional

import numpy as np
import torch

from qcore.errors import CalibrationError
from qcore.spec import FLOAT8_DTYPES, INTEGER_DTYPES, dtype_range

_FLOAT32 = struct.Struct("f")

__all__ = [
    "FLOAT8_DTYPES",
    "INTEGER_DTYPES",
    "ObserverBase",
    "ObserverConstructor",
    "ObserverOrFakeQuantizeBase",
    "calculate_qparams_from_min_max",
    "per_tensor_qparams_float32",
    "default_quant_range",
    "resolve_quant_range",
    "to_plain_dtype",
]

# INTEGER_DTYPES / FLOAT8_DTYPES (qcore.spec): the dtypes qcore observers quantize to; float8
# takes the same scale/zero-point math over ``int(finfo.min) .. int(finfo.max)``.
#: torch's quantized dtypes map to the plain integer dtype with the same range.
QTYPE_TO_DTYPE = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.qint32: torch.int32}

PER_TENSOR_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_QSCHEMES = (
    torch.per_channel_affine,
    torch.per_channel_symmetric,
    torch.per_channel_affine_float_qparams,
)
SYMMETRIC_QSCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)

DEFAULT_EPS = torch.finfo(torch.float32).eps


def to_plain_dtype(dtype: torch.dtype) -> torch.dtype:
    """Map ``torch.quint8``/``qint8``/``qint32`` to ``uint8``/``int8``/``int32``; others unchanged."""
    return QTYPE_TO_DTYPE.get(dtype, dtype)


def _names(items: Any) -> str:
    return ", ".join(str(item) for item in items)


def _check_integer_dtype(owner: str, dtype: Any, float8: bool = False) -> torch.dtype:
    plain = to_plain_dtype(dtype)
    allowed = INTEGER_DTYPES + FLOAT8_DTYPES if float8 else INTEGER_DTYPES
    if plain not in allowed:
        raise TypeError(
            f"{owner}: dtype {dtype} is not supported; allowed: {_names(allowed)} "
            f"(or {_names(QTYPE_TO_DTYPE)})"
        )
    return plain


def default_quant_range(dtype: torch.dtype, reduce_range: bool = False) -> tuple[int, int]:
    """The (quant_min, quant_max) torch.ao uses when none is given.

    ``reduce_range`` halves the 8-bit ranges (0..127, -64..63) and leaves wider dtypes alone.
    For float8 it is the format's whole range (torch.ao's 0..15 there is an accident of its
    bit-width formula, not a range anyone quantizes to).

    >>> default_quant_range(torch.int8, reduce_range=True)
    (-64, 63)
    """
    dtype = to_plain_dtype(dtype)
    if dtype == torch.int8:
        return (-64, 63) if reduce_range else (-128, 127)
    if dtype == torch.uint8:
        return (0, 127) if reduce_range else (0, 255)
    return dtype_range(dtype)


def resolve_quant_range(
    owner: str,
    dtype: torch.dtype,
    quant_min: Optional[int],
    quant_max: Optional[int],
    reduce_range: bool,
) -> tuple[int, int, bool]:
    """Validate a user range and return ``(quant_min, quant_max, has_customized_qrange)``.

    As in torch.ao, a range counts as customized only when both ends are given (a single end is
    ignored), it must contain 0 and have quant_min < quant_max, and ``reduce_range`` halves it
    (floor division). qcore also requires both ends to fit in ``dtype`` and raises ``ValueError``
    (torch.ao raises ``AssertionError`` and checks only the width of the range).
    """
    dtype = to_plain_dtype(dtype)
    if quant_min is None or quant_max is None:
        low, high = default_quant_range(dtype, reduce_range)
        return low, high, False
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: {name} must be an int or None, got {value!r}")
    low, high = dtype_range(dtype)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max)):
        if not low <= value <= high:
            raise ValueError(
                f"{owner}: {name}={value} is outside the range of {dtype}; "
                f"allowed: {low} <= quant_min < quant_max <= {high}"
            )
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"{owner}: the range quant_min={quant_min}, quant_max={quant_max} must include 0 "
            f"(allowed: {low} <= quant_min <= 0 <= quant_max <= {high})"
        )
    if quant_min >= quant_max:
        raise ValueError(
            f"{owner}: quant_min ({quant_min}) must be strictly less than quant_max ({quant_max})"
        )
    if reduce_range:
        quant_min, quant_max = quant_min // 2, quant_max // 2
    return quant_min, quant_max, True


def _check_min_max_valid(min_val: torch.Tensor, max_val: torch.Tensor, who: str) -> bool:
    """False (with a warning) before any data was seen; raises if min > max."""
    if min_val.numel() == 0 or max_val.numel() == 0:
        uninitialized = True
    elif min_val.dim() == 0 or max_val.dim() == 0:
        uninitialized = bool(min_val == float("inf")) and bool(max_val == float("-inf"))
    else:
        uninitialized = False
    if uninitialized:
        warnings.warn(
            f"{who}: calculate_qparams called before the observer saw any data; "
            "returning the default scale 1.0 and zero point 0",
            stacklevel=3,
        )
        return False
    if bool(torch.any(min_val > max_val)):
        raise CalibrationError(f"{who}: min {min_val} is greater than max {max_val}")
    return True


def calculate_qparams_from_min_max(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    *,
    dtype: torch.dtype,
    qscheme: torch.qscheme,
    quant_min: int,
    quant_max: int,
    eps: torch.Tensor,
    has_customized_qrange: bool,
    who: str = "observer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for a min/max pair (per tensor: 0-dim; per channel: 1-dim).

    Same operations, in the same order and dtypes, as torch.ao's
    ``UniformQuantizationObserverBase._calculate_qparams``, so results agree bit for bit:

    * symmetric: ``scale = max(-min_neg, max_pos) / ((quant_max - quant_min) / 2)`` clamped below
      by ``eps``; zero point 0, except for uint8 where it is 128, or the rounded-down midpoint of
      a customized range;
    * ``per_channel_affine_float_qparams``: ``scale = (max - min) / (quant_max - quant_min)``
      (1.0 where not above ``eps``) and a float zero point ``-min / scale``;
    * affine: ``scale = (max_pos - min_neg) / (quant_max - quant_min)`` clamped by ``eps``;
      ``zero_point = clamp(quant_min - round(min_neg / scale), quant_min, quant_max)`` (int32).

    ``eps`` is a 1-element float tensor; per-tensor results have shape ``[1]``.
    """
    dtype = to_plain_dtype(dtype)
    if _is_cpu_float32_scalar(min_val, max_val, eps) and qscheme in PER_TENSOR_QSCHEMES:
        return _per_tensor_qparams(
            min_val, max_val, dtype, qscheme, quant_min, quant_max, eps, has_customized_qrange, who
        )
    if not _check_min_max_valid(min_val, max_val, who):
        device_type = min_val.device.type
        return torch.tensor([1.0], device=device_type), torch.tensor([0], device=device_type)

    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    device = min_val_neg.device
    zero_point = torch.zeros(min_val_neg.size(), dtype=torch.int64, device=device)

    if qscheme in SYMMETRIC_QSCHEMES:
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = max_val_pos / (float(quant_max - quant_min) / 2)
        scale = torch.max(scale, eps)
        if dtype == torch.uint8:
            middle = (quant_min + quant_max) // 2 if has_customized_qrange else 128
            zero_point = zero_point.new_full(zero_point.size(), middle)
    elif qscheme == torch.per_channel_affine_float_qparams:
        scale = (max_val - min_val) / float(quant_max - quant_min)
        scale = torch.where(scale > eps, scale, torch.ones_like(scale))
        zero_point = -1 * min_val / scale
    else:
        scale = (max_val_pos - min_val_neg) / float(quant_max - quant_min)
        scale = torch.max(scale, eps)
        zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)

    # 0-dim results become shape [1], like torch.ao (and like FakeQuantize's buffers).
    if scale.dim() == 0:
        scale = torch.tensor([float(scale)], dtype=scale.dtype, device=device)
    if zero_point.dim() == 0:
        zero_point = torch.tensor([int(zero_point)], dtype=zero_point.dtype, device=device)
        if qscheme == torch.per_channel_affine_float_qparams:
            zero_point = torch.tensor([float(zero_point)], dtype=zero_point.dtype, device=device)
    return scale, zero_point


def _is_cpu_float32_scalar(*tensors: torch.Tensor) -> bool:
    return all(t.numel() == 1 and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _per_tensor_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    dtype: torch.dtype,
    qscheme: torch.qscheme,
    quant_min: int,
    quant_max: int,
    eps: torch.Tensor,
    has_customized_qrange: bool,
    who: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`calculate_qparams_from_min_max` for one float32 min/max pair on the CPU.

    The same float32 operations on numpy scalars instead of 0-dim tensors (IEEE arithmetic
    either way, so the same bits), a few times faster.
    """
    f32 = np.float32
    return per_tensor_qparams_float32(
        f32(min_val.item()),
        f32(max_val.item()),
        dtype=dtype,
        qscheme=qscheme,
        quant_min=quant_min,
        quant_max=quant_max,
        eps=f32(eps.item()),
        has_customized_qrange=has_customized_qrange,
        who=who,
    )


def to_float32(value: float) -> float:
    """``value`` rounded to float32, infinite beyond float32's range, as a Python float (how
    torch compares a float32 tensor with a Python float, too).

    A float32 addition, subtraction, multiplication or division is the double precision one
    rounded to float32 (double's 53 bits are enough that the two roundings never differ), so
    ``to_float32(a * b)`` is torch's float32 ``a * b`` for float32 values ``a`` and ``b``.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def per_tensor_qparams_float32(
    low: float,
    high: float,
    *,
    dtype: torch.dtype,
    qscheme: torch.qscheme,
    quant_min: int,
    quant_max: int,
    eps: float,
    has_customized_qrange: bool,
    who: str = "observer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`calculate_qparams_from_min_max` for a per-tensor qscheme, from float32 min, max
    and eps (float32 values, as numpy scalars or Python floats; CPU results). Every operation
    is torch's float32 one, done on Python floats and rounded with :func:`to_float32`."""
    low, high, eps = float(low), float(high), float(eps)
    if low == math.inf and high == -math.inf:
        warnings.warn(
            f"{who}: calculate_qparams called before the observer saw any data; "
            "returning the default scale 1.0 and zero point 0",
            stacklevel=3,
        )
        return torch.tensor([1.0]), torch.tensor([0])
    if low > high:
        raise CalibrationError(f"{who}: min {low} is greater than max {high}")
    min_neg = min(low, 0.0)
    max_pos = max(high, 0.0)
    if qscheme == torch.per_tensor_symmetric:
        scale = max(to_float32(max(-min_neg, max_pos) / to_float32(float(quant_max - quant_min) / 2)), eps)
        zero_point = 0
        if dtype == torch.uint8:
            zero_point = (quant_min + quant_max) // 2 if has_customized_qrange else 128
        return _one(scale, np.float32), _one(zero_point, np.int64)
    scale = max(to_float32(to_float32(max_pos - min_neg) / float(quant_max - quant_min)), eps)
    if scale == 0.0:  # eps 0 and an empty range: torch's 0/0 (nan) or x/0 (inf), as numpy gives it
        with np.errstate(all="ignore"):
            zero_point = quant_min - int(np.rint(np.float32(min_neg) / np.float32(scale)))
    else:
        zero_point = quant_min - round(to_float32(min_neg / scale))  # round: half to even, as rint
    zero_point = min(max(zero_point, quant_min), quant_max)
    return _one(scale, np.float32), _one(zero_point, np.int32)


def _one(value: Any, dtype: type) -> torch.Tensor:
    """A fresh one-element CPU tensor (``torch.tensor([value])`` costs three times as much)."""
    return torch.from_numpy(np.array([value], dtype=dtype))


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a constructor argument, equal for equal values."""
    if isinstance(value, ObserverConstructor):
        return ("ObserverConstructor", value._key())
    if hasattr(value, "p") and hasattr(value.p, "func"):  # torch.ao's _PartialWrapper
        return ("_PartialWrapper", value.p.func, _freeze(dict(value.p.keywords)))
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.detach().cpu().flatten().tolist()))
    try:
        hash(value)
    except TypeError:
        return ("repr", type(value), repr(value))
    return value


class ObserverConstructor:
    """A class plus keyword arguments: ``MinMaxObserver.with_args(eps=2**-12)``.

    Calling it builds a new instance (call-time keywords win); ``with_args`` adds more keywords;
    two constructors are equal (and hash equal) when their class and keywords are equal, so
    quantization specs built from separate ``with_args`` calls compare equal.
    """

    def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.kwargs = dict(kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.cls(*args, **{**self.kwargs, **kwargs})

    def with_args(self, **kwargs: Any) -> "ObserverConstructor":
        """A new constructor with these keywords added (they override earlier ones)."""
        return ObserverConstructor(self.cls, {**self.kwargs, **kwargs})

    def _key(self) -> tuple:
        return (self.cls, _freeze(self.kwargs))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObserverConstructor):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}.with_args({args})"


class ObserverOrFakeQuantizeBase(torch.nn.Module):
    """Common root of every qcore observer and fake-quantizer.

    ``node_name`` is the graph point the engine inserted the module for (``None`` until then);
    error messages name it.
    """

    node_name: Optional[str] = None

    @classmethod
    def with_args(cls, **kwargs: Any) -> ObserverConstructor:
        """A constructor that builds ``cls(**kwargs)``; chain ``.with_args(...)`` to add more."""
        return ObserverConstructor(cls, kwargs)

    def _who(self) -> str:
        if self.node_name:
            return f"{type(self).__name__} for node {self.node_name!r}"
        return type(self).__name__

    @classmethod
    def _reject_unknown_kwargs(cls, kwargs: dict[str, Any]) -> None:
        if not kwargs:
            return
        allowed = [
            name
            for name, param in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
        ]
        bad = ", ".join(sorted(kwargs))
        raise TypeError(
            f"{cls.__name__}() got unexpected keyword argument(s) {bad}; "
            f"allowed: {', '.join(allowed)}"
        )

    def has_observed(self) -> bool:
        """True once the module saw data it can compute qparams from."""
        raise NotImplementedError  # abstract: every observer class overrides it

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` from what was observed."""
        raise NotImplementedError  # abstract: every observer class overrides it


def resize_before_loading(module: torch.nn.Module, state_dict: dict, prefix: str, names: tuple) -> None:
    """Resize buffers whose shape is only known after the first forward (per-channel min/max,
    qparams) to the shapes in ``state_dict``, so a calibrated state dict loads."""
    for name in names:
        key = prefix + name
        if key in state_dict:
            getattr(module, name).resize_(state_dict[key].shape)


def _non_finite_kind(*values: torch.Tensor) -> str:
    has_nan = any(bool(torch.isnan(v).any()) for v in values)
    has_inf = any(bool(torch.isinf(v).any()) for v in values)
    return "NaN and inf" if has_nan and has_inf else ("NaN" if has_nan else "inf")


class ObserverBase(ObserverOrFakeQuantizeBase):
    """Uniform-quantization observer: dtype, qscheme, range and ``eps`` handling.

    Arguments are those of torch.ao's uniform observers. ``dtype`` may be ``torch.uint8``,
    ``int8``, ``int16``, ``int32`` or the q-types ``quint8``/``qint8``/``qint32`` (stored as the
    plain dtype). ``quant_min``/``quant_max`` default from ``dtype`` and ``reduce_range``; both
    given means a customized range. ``eps`` is kept as a 1-element buffer like torch.ao.
    """

    #: qschemes the concrete class accepts (the per-channel observers override it).
    allowed_qschemes: tuple = PER_TENSOR_QSCHEMES
    #: whether the class observes for float8 dtypes (min/max ones do; the histogram does not).
    supports_float8: bool = True
    eps: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        factory_kwargs: Optional[dict] = None,
        eps: float = DEFAULT_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        type(self)._reject_unknown_kwargs(kwargs)
        super().__init__()
        owner = type(self).__name__
        self.dtype = _check_integer_dtype(owner, dtype, float8=self.supports_float8)
        if qscheme not in self.allowed_qschemes:
            raise ValueError(
                f"{owner}: qscheme {qscheme} is not supported; allowed: {_names(self.allowed_qschemes)}"
            )
        self.qscheme = qscheme
        self.reduce_range = bool(reduce_range)
        self.is_dynamic = bool(is_dynamic)
        self.quant_min, self.quant_max, self.has_customized_qrange = resolve_quant_range(
            owner, self.dtype, quant_min, quant_max, self.reduce_range
        )
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("eps", torch.tensor([eps], **factory_kwargs))

    def _calculate_qparams(
        self, min_val: torch.Tensor, max_val: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return calculate_qparams_from_min_max(
            min_val,
            max_val,
            dtype=self.dtype,
            qscheme=self.qscheme,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            eps=self.eps,
            has_customized_qrange=self.has_customized_qrange,
            who=self._who(),
        )

    def _raise_non_finite(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        kind = _non_finite_kind(min_val, max_val)
        if self.node_name:
            who = f"observer for node {self.node_name!r}"
        else:
            who = f"{type(self).__name__} (not attached to a graph node)"
        raise CalibrationError(
            f"{who} saw {kind} in calibration data (observed min={min_val.tolist()}, "
            f"max={max_val.tolist()}); scale and zero point cannot be computed from non-finite "
            "values. Check the calibration inputs and the layers that produce this tensor, or "
            "sanitize them (e.g. torch.nan_to_num) before calibrating."
        )

    def _check_finite(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Raise ``CalibrationError`` if a reduced min/max (0-dim or per channel) is NaN or inf."""
        if min_val.dim() == 0:
            if math.isfinite(min_val.item()) and math.isfinite(max_val.item()):
                return
        elif bool(torch.isfinite(min_val).all()) and bool(torch.isfinite(max_val).all()):
            return
        self._raise_non_finite(min_val, max_val)

    def extra_repr(self) -> str:
        return (
            f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}"
        )
