"""Min-max observers: running min/max, moving average, per tensor and per channel.

The statistics are kept in ``min_val``/``max_val`` buffers (so ``state_dict`` and ``.to()`` carry
them) and updated exactly as torch.ao's observers of the same names update theirs; qparams come
from :func:`qcore.observers.base.calculate_qparams_from_min_max`.

>>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5, dtype=torch.int8)
>>> _ = obs(torch.tensor([0.0, 4.0])); _ = obs(torch.tensor([-2.0, 2.0]))
>>> obs.min_val, obs.max_val
(tensor(-1.), tensor(3.))
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from qcore.observers.base import DEFAULT_EPS, PER_CHANNEL_QSCHEMES, ObserverBase, resize_before_loading

__all__ = [
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver",
]


class MinMaxObserver(ObserverBase):
    """Per-tensor qparams from the running minimum and maximum of everything observed."""

    min_val: torch.Tensor
    max_val: torch.Tensor

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
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf"), **factory_kwargs))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **factory_kwargs))

    def _observe(self, x_orig: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The finite (min, max) of a non-empty input, in the buffers' dtype; None if empty."""
        if x_orig.numel() == 0:
            return None
        x = x_orig.detach().to(self.min_val.dtype)
        min_cur, max_cur = torch.aminmax(x)
        self._check_finite(min_cur, max_cur)
        return min_cur, max_cur

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Record the running min and max of ``x_orig``; return it unchanged."""
        observed = self._observe(x_orig)
        if observed is not None:
            min_cur, max_cur = observed
            self.min_val.copy_(torch.min(min_cur, self.min_val))
            self.max_val.copy_(torch.max(max_cur, self.max_val))
        return x_orig

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``, each of shape ``[1]``."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def has_observed(self) -> bool:
        return bool(self.min_val != float("inf"))

    def reset_min_max_vals(self) -> None:
        """Forget everything observed."""
        self.min_val.copy_(torch.tensor(float("inf")))
        self.max_val.copy_(torch.tensor(float("-inf")))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_val={self.min_val}, max_val={self.max_val}"


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Per-tensor qparams from a moving average of each batch's min and max.

    ``min = min + c * (batch_min - min)`` (the first batch sets it), same for max, with
    ``c = averaging_constant``. ``is_dynamic=True`` needs ``averaging_constant=1``.
    """

    def __init__(
        self,
        averaging_constant: float = 0.01,
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
        if is_dynamic and averaging_constant != 1:
            raise ValueError(
                f"{type(self).__name__}: is_dynamic=True needs averaging_constant=1 (the "
                f"qparams of a dynamic tensor come from that tensor alone), got {averaging_constant}"
            )
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        self.averaging_constant = averaging_constant

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Update the moving-average min and max with ``x_orig``; return it unchanged."""
        observed = self._observe(x_orig)
        if observed is None:
            return x_orig
        min_cur, max_cur = observed
        uninitialized = bool(self.min_val == float("inf")) and bool(self.max_val == float("-inf"))
        if uninitialized:
            min_val, max_val = min_cur, max_cur
        else:
            min_val = self.min_val + self.averaging_constant * (min_cur - self.min_val)
            max_val = self.max_val + self.averaging_constant * (max_cur - self.max_val)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        return x_orig


class PerChannelMinMaxObserver(ObserverBase):
    """Per-channel qparams from the running min and max of each slice along ``ch_axis``."""

    allowed_qschemes = PER_CHANNEL_QSCHEMES
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        factory_kwargs: Optional[dict] = None,
        eps: float = DEFAULT_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if is_dynamic:
            raise ValueError(
                f"{type(self).__name__} does not support is_dynamic=True (dynamic quantization "
                "is per tensor; use PlaceholderObserver)"
            )
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise TypeError(f"{type(self).__name__}: ch_axis must be an int, got {ch_axis!r}")
        self.ch_axis = ch_axis
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))

    def _observe(self, x_orig: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-channel finite (min, max) of a non-empty input; None if empty."""
        if x_orig.numel() == 0:
            return None
        x = x_orig.detach()
        if not -x.dim() <= self.ch_axis < max(x.dim(), 1):
            raise ValueError(
                f"{self._who()}: ch_axis={self.ch_axis} is out of range for an input with "
                f"{x.dim()} dimensions (shape {tuple(x.shape)})"
            )
        axes = list(range(x.dim()))
        axes[self.ch_axis] = 0
        axes[0] = self.ch_axis
        y = torch.flatten(x.permute(axes).to(self.min_val.dtype), start_dim=1)
        min_cur, max_cur = torch.aminmax(y, dim=1)
        self._check_finite(min_cur, max_cur)
        return min_cur, max_cur

    def _store(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        self.min_val.resize_(min_val.shape)
        self.max_val.resize_(max_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Record each channel's running min and max; return ``x_orig`` unchanged."""
        observed = self._observe(x_orig)
        if observed is None:
            return x_orig
        min_cur, max_cur = observed
        if self.has_observed():
            min_cur = torch.min(min_cur, self.min_val)
            max_cur = torch.max(max_cur, self.max_val)
        self._store(min_cur, max_cur)
        return x_orig

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``, one entry per channel."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def has_observed(self) -> bool:
        return self.min_val.numel() > 0 and self.max_val.numel() > 0

    def reset_min_max_vals(self) -> None:
        """Forget everything observed."""
        self._store(torch.tensor([]), torch.tensor([]))

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
        resize_before_loading(self, state_dict, prefix, ("min_val", "max_val"))  # buffers start empty
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ch_axis={self.ch_axis}, min_val={self.min_val}, max_val={self.max_val}"


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel qparams from a moving average of each batch's per-channel min and max."""

    def __init__(
        self,
        averaging_constant: float = 0.01,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        factory_kwargs: Optional[dict] = None,
        eps: float = DEFAULT_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            ch_axis=ch_axis,
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        self.averaging_constant = averaging_constant

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Update each channel's moving-average min and max; return ``x_orig`` unchanged."""
        observed = self._observe(x_orig)
        if observed is None:
            return x_orig
        min_cur, max_cur = observed
        if self.has_observed():
            min_cur = self.min_val + self.averaging_constant * (min_cur - self.min_val)
            max_cur = self.max_val + self.averaging_constant * (max_cur - self.max_val)
        self._store(min_cur, max_cur)
        return x_orig
