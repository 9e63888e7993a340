"""Fake-quantize modules for quantization-aware training.

A fake-quantizer observes its input (while ``observer_enabled``), refreshes ``scale`` and
``zero_point`` from the observer, and returns ``dequantize(quantize(x))`` (while
``fake_quant_enabled``), with gradients passing straight through. The math is torch's own
``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` /
``fused_moving_avg_obs_fake_quant`` ops, driven as torch.ao's modules drive them.

>>> fq = FakeQuantize(dtype=torch.int8, quant_min=-128, quant_max=127, averaging_constant=1.0)
>>> fq(torch.tensor([-1.0, 0.3, 1.0]))
tensor([-0.9961,  0.2980,  0.9961])
>>> model = torch.nn.Sequential(fq)
>>> _ = model.apply(disable_observer)
>>> int(fq.observer_enabled)
0
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.ao.quantization import fake_quantize as _ao_fake_quantize
from torch.ao.quantization import observer as _ao_observer

from qcore.errors import CalibrationError
from qcore.observers.base import (
    FLOAT8_DTYPES,
    PER_CHANNEL_QSCHEMES,
    PER_TENSOR_QSCHEMES,
    SYMMETRIC_QSCHEMES,
    ObserverOrFakeQuantizeBase,
    _non_finite_kind,
    resize_before_loading,
    to_plain_dtype,
)
from qcore.observers.fixed_qparams import FixedQParamsObserver
from qcore.observers.minmax import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

__all__ = [
    "FakeQuantize",
    "FixedQParamsFakeQuantize",
    "FusedMovingAvgObsFakeQuantize",
    "disable_fake_quant",
    "disable_observer",
    "enable_fake_quant",
    "enable_observer",
]


class FakeQuantize(ObserverOrFakeQuantizeBase):
    """Observe, then fake-quantize, per tensor or per channel.

    ``observer`` is an observer class or ``with_args`` constructor (qcore's or torch.ao's);
    ``observer_kwargs`` go to it. ``quant_min``/``quant_max``, when both given, override the
    observer's range. Attributes mirror the observer's (``dtype``, ``qscheme``, ``quant_min``,
    ``quant_max``, ``is_dynamic``, ``ch_axis``; ``ch_axis`` is -1 for per-tensor observers).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor
    quant_min: int
    quant_max: int

    def __init__(
        self,
        observer: Callable[..., torch.nn.Module] = MovingAverageMinMaxObserver,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        is_dynamic: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        self._node_name: Optional[str] = None
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))
        if quant_min is not None and quant_max is not None:
            if quant_min > quant_max:
                raise ValueError(
                    f"{type(self).__name__}: quant_min ({quant_min}) must be <= quant_max ({quant_max})"
                )
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        observer_kwargs["is_dynamic"] = is_dynamic
        self.activation_post_process = observer(**observer_kwargs)
        post: Any = self.activation_post_process  # qcore's or torch.ao's observer: duck-typed attributes
        self.quant_min = post.quant_min
        self.quant_max = post.quant_max
        self.is_dynamic = post.is_dynamic
        self.dtype = to_plain_dtype(post.dtype)
        if self.dtype in FLOAT8_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: dtype {self.dtype} cannot be fake-quantized: torch's "
                f"fake_quantize kernels simulate integer grids only; quantize to float8 after "
                f"training (prepare_pt2e) or train with an integer dtype"
            )
        self.qscheme = post.qscheme
        self.ch_axis = getattr(post, "ch_axis", -1)
        if self.qscheme not in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES:
            raise ValueError(
                f"{type(self).__name__}: qscheme {self.qscheme} is not supported; allowed: "
                f"{', '.join(str(q) for q in PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES)}"
            )
        self.is_per_channel = self.qscheme in PER_CHANNEL_QSCHEMES
        zero_point_dtype = torch.float if self.qscheme == torch.per_channel_affine_float_qparams else torch.int
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([0], dtype=zero_point_dtype))

    # node_name is forwarded to the observer so that its calibration errors name the node too
    @property
    def node_name(self) -> Optional[str]:  # type: ignore[override]
        return self.__dict__.get("_node_name")

    @node_name.setter
    def node_name(self, value: Optional[str]) -> None:
        self.__dict__["_node_name"] = value
        post = self._modules.get("activation_post_process")
        if post is not None:
            setattr(post, "node_name", value)  # an attribute of qcore's observers, not a submodule

    # ------------------------------------------------------------------ switches
    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled[0] = 1 if enabled else 0

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled[0] = 1 if enabled else 0

    def disable_observer(self) -> None:
        self.enable_observer(False)

    # ------------------------------------------------------------------ qparams
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's current ``(scale, zero_point)``."""
        return self.activation_post_process.calculate_qparams()

    def has_observed(self) -> bool:
        post = self.activation_post_process
        if hasattr(post, "has_observed"):
            return bool(post.has_observed())
        min_val = getattr(post, "min_val", None)
        if isinstance(min_val, torch.Tensor):
            return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())
        return True

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Update the qparams from ``X`` (if observing), then fake-quantize it (if enabled)."""
        if self.observer_enabled[0] == 1:
            self.activation_post_process(X.detach())
            scale, zero_point = self.calculate_qparams()
            scale, zero_point = scale.to(self.scale.device), zero_point.to(self.zero_point.device)
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if self.fake_quant_enabled[0] == 1:
            if self.is_per_channel:
                X = torch.fake_quantize_per_channel_affine(
                    X, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
                )
            else:
                X = torch.fake_quantize_per_tensor_affine(
                    X, self.scale, self.zero_point, self.quant_min, self.quant_max
                )
        return X

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        resize_before_loading(self, state_dict, prefix, ("scale", "zero_point"))  # per-channel shapes
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, "
            f"qscheme={self.qscheme}, ch_axis={self.ch_axis}, scale={self.scale}, "
            f"zero_point={self.zero_point}"
        )


_MOVING_AVERAGE_OBSERVERS = (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    _ao_observer.MovingAverageMinMaxObserver,
    _ao_observer.MovingAveragePerChannelMinMaxObserver,
)


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """Moving-average min/max observation and fake quantization in one fused torch op.

    Same results as :class:`FakeQuantize` with a moving-average observer, computed by
    ``torch.fused_moving_avg_obs_fake_quant`` (as torch.ao's module of the same name does). The
    observer must be a (per-channel) moving-average min-max observer; its ``min_val``/``max_val``
    buffers hold the running statistics.
    """

    def __init__(
        self,
        observer: Callable[..., torch.nn.Module] = MovingAverageMinMaxObserver,
        quant_min: Optional[int] = 0,
        quant_max: Optional[int] = 255,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        if not isinstance(self.activation_post_process, _MOVING_AVERAGE_OBSERVERS):
            raise TypeError(
                f"FusedMovingAvgObsFakeQuantize needs a MovingAverageMinMaxObserver or "
                f"MovingAveragePerChannelMinMaxObserver, got "
                f"{type(self.activation_post_process).__name__}"
            )
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.long))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.long))
        self.is_symmetric_quant = self.qscheme in SYMMETRIC_QSCHEMES

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Update the running min/max and qparams (if observing), fake-quantize (if enabled).

        torch's fused kernel runs per-channel on axis 0 only; another axis (a transposed conv's
        weight, axis 1) takes the unfused path: the moving-average observer, then
        ``fake_quantize_per_channel_affine`` on that axis: the same running statistics and
        gradient, qparams as torch.ao's unfused ``FakeQuantize`` computes them (the fused kernel's
        symmetric scale differs from those by under 0.5 %).
        """
        post = self.activation_post_process
        if self.is_per_channel and X.dim() > 0 and self.ch_axis % X.dim() != 0:
            out = super().forward(X)
            if self.observer_enabled[0] == 1 and X.numel() > 0:
                self._check_finite(post.min_val, post.max_val)
            return out
        out = torch.fused_moving_avg_obs_fake_quant(
            X,
            self.observer_enabled,
            self.fake_quant_enabled,
            post.min_val,
            post.max_val,
            self.scale,
            self.zero_point,
            post.averaging_constant,
            post.quant_min,
            post.quant_max,
            self.ch_axis,
            self.is_per_channel,
            self.is_symmetric_quant,
        )
        if self.observer_enabled[0] == 1 and X.numel() > 0:
            self._check_finite(post.min_val, post.max_val)
        return out

    def _check_finite(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        if bool(torch.isfinite(min_val).all()) and bool(torch.isfinite(max_val).all()):
            return
        kind = _non_finite_kind(min_val, max_val)
        who = f"fake-quantizer for node {self.node_name!r}" if self.node_name else type(self).__name__
        raise CalibrationError(
            f"{who} saw {kind} in its training data (running min={min_val.tolist()}, "
            f"max={max_val.tolist()}); scale and zero point cannot be computed from non-finite "
            "values. Check the inputs and the layers that produce this tensor."
        )


class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake-quantize with constant qparams taken from a :class:`FixedQParamsObserver`.

    >>> fq = FixedQParamsFakeQuantize(
    ...     observer=FixedQParamsObserver.with_args(scale=1.0 / 256.0, zero_point=0))
    >>> fq.calculate_qparams()
    (tensor([0.0039]), tensor([0], dtype=torch.int32))
    """

    def __init__(self, observer: Callable[..., torch.nn.Module]) -> None:
        super().__init__(observer=observer)
        post = self.activation_post_process
        if not isinstance(post, (FixedQParamsObserver, _ao_observer.FixedQParamsObserver)):
            raise TypeError(
                f"FixedQParamsFakeQuantize needs a FixedQParamsObserver, got {type(post).__name__}"
            )
        if self.qscheme not in PER_TENSOR_QSCHEMES:
            raise ValueError(f"FixedQParamsFakeQuantize supports per-tensor qschemes only, got {self.qscheme}")
        self._observer_ctr = observer
        self.scale = post.scale
        self.zero_point = post.zero_point

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def has_observed(self) -> bool:
        return True


# ---------------------------------------------------------------------- model.apply helpers
_FAKE_QUANT_TYPES = (FakeQuantize, _ao_fake_quantize.FakeQuantizeBase)


def _is_fake_quant(module: torch.nn.Module) -> bool:
    return isinstance(module, _FAKE_QUANT_TYPES)


def disable_observer(module: torch.nn.Module) -> None:
    """Freeze the qparams of a fake-quantizer (qcore's or torch.ao's); use with ``model.apply``."""
    if _is_fake_quant(module):
        module.disable_observer()


def enable_observer(module: torch.nn.Module) -> None:
    """Let a fake-quantizer update its qparams again; use with ``model.apply``."""
    if _is_fake_quant(module):
        module.enable_observer()


def disable_fake_quant(module: torch.nn.Module) -> None:
    """Make a fake-quantizer pass its input through unchanged; use with ``model.apply``."""
    if _is_fake_quant(module):
        module.disable_fake_quant()


def enable_fake_quant(module: torch.nn.Module) -> None:
    """Turn fake quantization back on; use with ``model.apply``."""
    if _is_fake_quant(module):
        module.enable_fake_quant()
