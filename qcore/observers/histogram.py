"""Histogram observer: qparams that minimise the L2 quantization error over a running histogram.

``forward`` accumulates a ``bins``-bin histogram over the running [min, max] range and re-bins
the old counts when the range grows, with the same operations as torch.ao's
``HistogramObserver`` (so the histogram is bit-identical).

``calculate_qparams`` runs torch.ao's search (move the start or end bin by quantiles in steps of
1e-5, stop when the L2 error of quantizing with the shrunk range stops falling) with the same
float32 arithmetic, in :mod:`qcore.observers.histogram_search`: binary searches on the
cumulative histogram instead of a Python loop over its elements, and the errors of a batch of
candidate ranges computed at once with array operations instead of one tensor program per
candidate. The result (start and end bin, hence scale and zero point) is the same as torch.ao's,
bit for bit, at a small fraction of the time (``bench/bench_histogram.py``).

>>> obs = HistogramObserver(dtype=torch.int8)
>>> _ = obs(torch.linspace(-1.0, 1.0, 1000))
>>> scale, zero_point = obs.calculate_qparams()
>>> round(float(scale), 5), int(zero_point)
(0.00784, 0)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch

from qcore.observers.base import (
    DEFAULT_EPS,
    PER_TENSOR_QSCHEMES,
    ObserverBase,
    per_tensor_qparams_float32,
    to_float32,
)
from qcore.observers.histogram_search import search_bin_range

__all__ = ["HistogramObserver"]

#: Inputs up to this size are counted with numpy (torch's elementwise kernels stay on one thread
#: below 32768 elements; torch.histc already splits above 200).
_HOST_COUNT_LIMIT = 32768


def _all_float32_on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _histc(values: np.ndarray, bins: int, low: float, high: float) -> np.ndarray:
    """``torch.histc(values, bins, min=low, max=high)`` for a float32 array, the same counts.

    torch.histc's rules: when ``low == high`` the range is the data's own, widened by 1 on each
    side if still empty; values outside ``[low, high]`` are not counted; a value goes to bin
    ``int((value - low) * bins / (high - low))`` computed in float32, the last bin including
    ``high``.
    """
    if low == high and values.size:
        low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 1, high + 1
    left, right = np.float32(low), np.float32(high)
    if values.size and not (values.min() >= left and values.max() <= right):
        values = values[(values >= left) & (values <= right)]
    with np.errstate(all="ignore"):
        position = ((values - left) * np.float32(bins)) / (right - left)
    index = position.astype(np.int64)
    index[index == bins] = bins - 1
    return np.bincount(index, minlength=bins).astype(np.float32)


class HistogramObserver(ObserverBase):
    """Per-tensor qparams chosen to minimise the L2 quantization error of a running histogram.

    ``bins`` is the number of histogram bins; when the observed range grows, the old histogram
    is upsampled ``upsample_rate`` times and re-binned into the new range (torch.ao uses 16 and
    does not expose it). The histogram is float32. NaN or inf in the input raise
    ``CalibrationError`` (torch.ao drops inf values with a warning and fails on NaN).
    """

    histogram: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    supports_float8 = False  # its search spreads 2**bits integer bins

    def __init__(
        self,
        bins: int = 2048,
        dtype: torch.dtype = torch.uint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: Optional[int] = None,
        quant_max: Optional[int] = None,
        factory_kwargs: Optional[dict] = None,
        eps: float = DEFAULT_EPS,
        is_dynamic: bool = False,
        upsample_rate: int = 16,
        **kwargs: Any,
    ) -> None:
        if is_dynamic:
            raise ValueError(
                "HistogramObserver does not support is_dynamic=True (use PlaceholderObserver "
                "for dynamically quantized activations)"
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
        for name, value in (("bins", bins), ("upsample_rate", upsample_rate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HistogramObserver: {name} must be a positive int, got {value!r}")
        factory_kwargs = dict(torch.nn.factory_kwargs(factory_kwargs))
        if factory_kwargs.get("dtype", torch.float32) != torch.float32:
            raise ValueError(
                f"HistogramObserver keeps a float32 histogram; factory_kwargs dtype "
                f"{factory_kwargs['dtype']} is not supported (only the device may be set)"
            )
        factory_kwargs["dtype"] = torch.float32
        self.bins = bins
        self.upsample_rate = upsample_rate
        self.dst_nbins = 2 ** torch.iinfo(self.dtype).bits
        self.register_buffer("histogram", torch.zeros(bins, **factory_kwargs))
        self.register_buffer("min_val", torch.tensor(float("inf"), **factory_kwargs))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **factory_kwargs))

    # ------------------------------------------------------------------ observing
    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Add ``x_orig`` to the histogram (re-binning if its range grows); return it unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        x = x_orig.detach()
        if self._counts_on_host(x):
            self._observe_small(x)
            return x_orig
        x_min, x_max = torch.aminmax(x)
        self._check_finite(x_min, x_max)
        current_min, current_max = self.min_val, self.max_val
        if bool(current_min == float("inf")) or bool(current_max == float("-inf")):
            self._reset_histogram(x, x_min, x_max)
            return x_orig
        new_min = torch.min(current_min, x_min).detach()
        new_max = torch.max(current_max, x_max).detach()
        update = torch.histc(x, self.bins, min=new_min, max=new_max).to(self.histogram.device)
        if bool(new_min == current_min) and bool(new_max == current_max):
            self.histogram.copy_(self.histogram + update)
            return x_orig
        combined = self._combine_histograms(
            self.histogram, current_min, current_max, update, new_min, new_max
        )
        self.histogram.copy_(combined)
        self.min_val.copy_(new_min)
        self.max_val.copy_(new_max)
        return x_orig

    def _counts_on_host(self, x: torch.Tensor) -> bool:
        """True when ``x`` is a small float32 CPU tensor and the buffers are float32 on the CPU."""
        return (
            x.numel() <= _HOST_COUNT_LIMIT
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.histogram.dtype == torch.float32
            and self.histogram.device.type == "cpu"
            and self.min_val.dtype == torch.float32
            and self.min_val.device.type == "cpu"
        )

    def _observe_small(self, x: torch.Tensor) -> None:
        """:meth:`forward` for a small float32 CPU input: the same steps on Python floats and
        numpy arrays (``torch.histc`` hands anything above 200 elements to torch's thread pool,
        which costs far more than the counting). Same histogram, bit for bit.
        """
        x_min_t, x_max_t = torch.aminmax(x)
        x_min, x_max = x_min_t.item(), x_max_t.item()
        if not (math.isfinite(x_min) and math.isfinite(x_max)):
            self._raise_non_finite(x_min_t, x_max_t)
        values = x.reshape(-1).numpy()
        current_min, current_max = self.min_val.item(), self.max_val.item()
        if current_min == math.inf or current_max == -math.inf:
            self.min_val.fill_(x_min)
            self.max_val.fill_(x_max)
            self.histogram.copy_(torch.from_numpy(_histc(values, self.bins, x_min, x_max)))
            return
        # torch.min / torch.max of two one-element tensors keep the first one on a tie, as
        # Python's min and max do
        new_min, new_max = min(current_min, x_min), max(current_max, x_max)
        update = torch.from_numpy(_histc(values, self.bins, new_min, new_max))
        if new_min == current_min and new_max == current_max:
            self.histogram.add_(update)
            return
        new_min_t = torch.tensor(new_min, dtype=torch.float32)
        new_max_t = torch.tensor(new_max, dtype=torch.float32)
        combined = self._combine_histograms(
            self.histogram, self.min_val, self.max_val, update, new_min_t, new_max_t
        )
        self.histogram.copy_(combined)
        self.min_val.fill_(new_min)
        self.max_val.fill_(new_max)

    def _reset_histogram(self, x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        self.histogram.copy_(torch.histc(x, self.bins, min=min_val, max=max_val))

    def _upscale_histogram(
        self,
        histogram: torch.Tensor,
        orig_min: torch.Tensor,
        orig_max: torch.Tensor,
        update_min: torch.Tensor,
        update_max: torch.Tensor,
    ) -> torch.Tensor:
        """Re-bin ``histogram`` (over orig range) into ``bins`` bins over the update range.

        Each bin is split into ``upsample_rate`` equal parts whose counts go to the new bin that
        contains their mid point.
        """
        fine_bins = self.bins * self.upsample_rate
        fine_width = (orig_max - orig_min) / fine_bins
        fine_edges = torch.linspace(orig_min, orig_max, fine_bins + 1, device=orig_min.device)[:-1]
        boundaries = torch.linspace(update_min, update_max, self.bins + 1, device=update_min.device)
        if _all_float32_on_cpu(histogram, fine_edges, boundaries, fine_width):
            # the same float32 arithmetic and binary search in numpy: torch would hand each of
            # these 32768-element operations to its thread pool
            fine_counts = torch.from_numpy(
                np.repeat(histogram.numpy(), self.upsample_rate) / np.float32(self.upsample_rate)
            )
            mid_points_np = fine_edges.numpy() + np.float32(0.5) * fine_width.numpy()
            assignment_np = np.searchsorted(boundaries.numpy(), mid_points_np, side="right") - 1
            np.clip(assignment_np, 0, self.bins - 1, out=assignment_np)
            return torch.bincount(torch.from_numpy(assignment_np), weights=fine_counts, minlength=self.bins)
        histogram = histogram.repeat_interleave(self.upsample_rate) / self.upsample_rate
        mid_points = fine_edges.to(histogram.device) + 0.5 * fine_width
        assignment = torch.bucketize(mid_points, boundaries.to(histogram.device), right=True) - 1
        assignment[assignment >= self.bins] = self.bins - 1
        assignment[assignment < 0] = 0
        return torch.bincount(assignment, weights=histogram, minlength=self.bins)

    def _combine_histograms(
        self,
        orig_hist: torch.Tensor,
        orig_min: torch.Tensor,
        orig_max: torch.Tensor,
        update_hist: torch.Tensor,
        update_min: torch.Tensor,
        update_max: torch.Tensor,
    ) -> torch.Tensor:
        """``update_hist`` (over the new range) plus the old histogram moved into that range."""
        if bool(update_min == orig_min) and bool(update_max == orig_max):
            return orig_hist + update_hist
        if bool(orig_min == orig_max):
            # everything seen so far was one value: put all its counts in that value's bin
            moved = torch.histc(orig_min, bins=self.bins, min=update_min, max=update_max)
            return moved * torch.sum(orig_hist) + update_hist
        moved = self._upscale_histogram(orig_hist, orig_min, orig_max, update_min, update_max)
        return update_hist + moved

    def has_observed(self) -> bool:
        return self.min_val.item() != math.inf

    def reset_min_max_vals(self) -> None:
        """Forget everything observed (histogram and range)."""
        self.histogram.zero_()
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    # ------------------------------------------------------------------ qparams
    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) range with the smallest L2 quantization error, as torch.ao finds it."""
        new_min, new_max = self._search_range(self.min_val.item(), self.max_val.item())
        device = self.min_val.device
        return (
            torch.tensor(new_min, dtype=torch.float32, device=device),
            torch.tensor(new_max, dtype=torch.float32, device=device),
        )

    def _search_range(self, min_val: float, max_val: float) -> tuple[float, float]:
        """:meth:`_non_linear_param_search` as Python floats (float32 values)."""
        histogram = self._buffers["histogram"]
        start, end = search_bin_range(histogram, (max_val - min_val) / self.bins, self.dst_nbins)
        # torch.ao's float32 arithmetic: bin_width = (max - min) / bins, new_min = min + bin_width *
        # start, new_max = min + bin_width * (end + 1), one rounded operation at a time
        low, high = to_float32(min_val), to_float32(max_val)
        bin_width = to_float32(to_float32(high - low) / self.bins)
        new_min = to_float32(low + to_float32(bin_width * start))
        new_max = to_float32(low + to_float32(bin_width * (end + 1)))
        return new_min, new_max

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of shape ``[1]``; the defaults 1.0 and 0 before any data."""
        buffers = self._buffers  # (one dict lookup each, not nn.Module.__getattr__)
        min_buffer, max_buffer, eps = buffers["min_val"], buffers["max_val"], buffers["eps"]
        min_val, max_val = min_buffer.item(), max_buffer.item()
        if min_val == math.inf and max_val == -math.inf:
            warnings.warn(
                f"{self._who()}: calculate_qparams called before the observer saw any data; "
                "returning the default scale 1.0 and zero point 0",
                stacklevel=2,
            )
            device = min_buffer.device.type
            return torch.tensor([1.0], device=device), torch.tensor([0], device=device)
        if buffers["histogram"].numel() != self.bins:
            raise ValueError(
                f"{self._who()}: the histogram has {buffers['histogram'].numel()} bins, expected {self.bins}"
            )
        if (
            self.qscheme in PER_TENSOR_QSCHEMES
            and min_buffer.is_cpu
            and eps.is_cpu
            and eps.dtype == torch.float32
            and eps.numel() == 1
        ):
            # the float32 scalar path _calculate_qparams takes for these buffers, without the
            # round trip through tensors
            new_min, new_max = self._search_range(min_val, max_val)
            return per_tensor_qparams_float32(
                new_min,
                new_max,
                dtype=self.dtype,
                qscheme=self.qscheme,
                quant_min=self.quant_min,
                quant_max=self.quant_max,
                eps=eps.item(),
                has_customized_qrange=self.has_customized_qrange,
                who=self._who(),
            )
        search_min, search_max = self._non_linear_param_search()
        return self._calculate_qparams(search_min, search_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, min_val={self.min_val}, max_val={self.max_val}"
