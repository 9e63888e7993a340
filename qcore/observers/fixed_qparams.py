"""Fixed-qparams observer: a constant scale and zero point (sigmoid, tanh, softmax outputs).

>>> obs = FixedQParamsObserver(scale=1.0 / 256.0, zero_point=0)
>>> obs.calculate_qparams()
(tensor([0.0039]), tensor([0], dtype=torch.int32))
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from qcore.observers.base import (
    PER_TENSOR_QSCHEMES,
    ObserverOrFakeQuantizeBase,
    _check_integer_dtype,
    resolve_quant_range,
)

__all__ = ["FixedQParamsObserver"]


class FixedQParamsObserver(ObserverOrFakeQuantizeBase):
    """Identity module whose qparams are given up front (per tensor only).

    ``scale``/``zero_point`` are kept in buffers ``scale`` (float32 ``[1]``) and ``zero_point``
    (int32 ``[1]``) as in torch.ao. A missing ``quant_min``/``quant_max`` is the dtype's bound
    (torch.ao defaults to 0 and 255 whatever the dtype; the same for uint8).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        scale: float,
        zero_point: int,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        type(self)._reject_unknown_kwargs(kwargs)
        super().__init__()
        if is_dynamic:
            raise ValueError("FixedQParamsObserver does not support is_dynamic=True (its qparams are fixed)")
        self.dtype = _check_integer_dtype("FixedQParamsObserver", dtype)
        if qscheme not in PER_TENSOR_QSCHEMES:
            raise ValueError(
                f"FixedQParamsObserver: qscheme {qscheme} is not supported; allowed: "
                f"{', '.join(str(q) for q in PER_TENSOR_QSCHEMES)}"
            )
        if quant_min is None or quant_max is None:
            info = torch.iinfo(self.dtype)
            quant_min = int(info.min) if quant_min is None else quant_min
            quant_max = int(info.max) if quant_max is None else quant_max
        self.quant_min, self.quant_max, _ = resolve_quant_range(
            "FixedQParamsObserver", self.dtype, quant_min, quant_max, reduce_range=False
        )
        if not float(scale) > 0:
            raise ValueError(f"FixedQParamsObserver: scale must be > 0, got {scale}")
        if not self.quant_min <= int(zero_point) <= self.quant_max:
            raise ValueError(
                f"FixedQParamsObserver: zero_point={zero_point} is outside "
                f"[quant_min, quant_max] = [{self.quant_min}, {self.quant_max}]"
            )
        self.qscheme = qscheme
        self.is_dynamic = False
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` unchanged."""
        return x

    def has_observed(self) -> bool:
        """Always True: the qparams do not depend on data."""
        return True

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(scale, zero_point)`` buffers."""
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return (
            f"scale={float(self.scale)}, zero_point={int(self.zero_point)}, dtype={self.dtype}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}"
        )
