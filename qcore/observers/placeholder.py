"""Placeholder observer: records nothing, carries the dtype and range to convert.

Used for dynamically quantized activations (``is_dynamic=True``: the qparams are chosen from each
tensor at run time by ``choose_qparams``) and for float16 casts, which need no qparams.

>>> obs = PlaceholderObserver(dtype=torch.int8, is_dynamic=True)
>>> obs.quant_min, obs.quant_max
(-128, 127)
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

from qcore.observers.base import (
    DEFAULT_EPS,
    INTEGER_DTYPES,
    ObserverOrFakeQuantizeBase,
    default_quant_range,
    to_plain_dtype,
)

__all__ = ["PlaceholderObserver"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PlaceholderObserver(ObserverOrFakeQuantizeBase):
    """Identity module that only describes how its tensor is quantized.

    ``dtype`` is an integer dtype (q-types are mapped to plain ones) or ``float16``/
    ``bfloat16``/``float32``. For integer dtypes a missing ``quant_min``/``quant_max`` defaults to
    the dtype's range (torch.ao leaves them ``None``). ``compute_dtype`` is torch.ao's deprecated
    spelling of ``is_dynamic=True``.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        custom_op_name: str = "",
        compute_dtype: Optional[torch.dtype] = None,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        qscheme: Optional[torch.qscheme] = None,
        eps: Optional[float] = None,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        type(self)._reject_unknown_kwargs(kwargs)
        super().__init__()
        plain = to_plain_dtype(dtype)
        if plain not in INTEGER_DTYPES + _FLOAT_DTYPES:
            raise TypeError(
                f"PlaceholderObserver: dtype {dtype} is not supported; allowed: "
                f"{', '.join(str(d) for d in INTEGER_DTYPES + _FLOAT_DTYPES)}"
            )
        if compute_dtype is not None:
            warnings.warn(
                "PlaceholderObserver: compute_dtype is deprecated, pass is_dynamic=True instead",
                stacklevel=2,
            )
            is_dynamic = True
        if plain in INTEGER_DTYPES and (quant_min is None or quant_max is None):
            default_min, default_max = default_quant_range(plain)
            quant_min = default_min if quant_min is None else quant_min
            quant_max = default_max if quant_max is None else quant_max
        self.dtype = plain
        self.qscheme = torch.per_tensor_affine if qscheme is None else qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.eps = DEFAULT_EPS if eps is None else eps
        self.custom_op = custom_op_name
        self.is_dynamic = bool(is_dynamic)
        self._observed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` unchanged."""
        self._observed = True
        return x

    def has_observed(self) -> bool:
        """True once a forward ran (nothing is recorded; dynamic qparams need no data)."""
        return self._observed

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError(
            f"{self._who()} has no qparams to calculate: "
            + (
                "the tensor is quantized dynamically, its scale and zero point are computed at "
                "run time from each input (choose_qparams)"
                if self.is_dynamic
                else f"dtype {self.dtype} is a cast, not an integer quantization"
            )
        )

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, is_dynamic={self.is_dynamic}"
