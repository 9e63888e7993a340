"""Histogram observer: qparams that minimise the L2 quantization error over a running histogram.

``forward`` accumulates a ``bins``-bin histogram over the running [min, max] range and re-bins
the old counts when the range grows, with the same operations as torch.ao's
``HistogramObserver`` (so the histogram is bit-identical).

``calculate_qparams`` runs torch.ao's search (move the start or end bin by quantiles in steps of
1e-5, stop when the L2 error of quantizing with the shrunk range stops falling) with the same
float32 arithmetic, but:

* the walk over quantiles is done with binary searches on the cumulative histogram and skips the
  steps that move no bin, instead of a Python loop over ``cumsum`` tensor elements;
* the errors of a batch of candidate ranges are computed at once with array operations instead
  of one tensor program per candidate.

The result (start and end bin, hence scale and zero point) is the same as torch.ao's, at a
small fraction of the time (``bench/bench_histogram.py``).

>>> obs = HistogramObserver(dtype=torch.int8)
>>> _ = obs(torch.linspace(-1.0, 1.0, 1000))
>>> scale, zero_point = obs.calculate_qparams()
>>> round(float(scale), 5), int(zero_point)
(0.00784, 0)
"""

from __future__ import annotations

import array
import bisect
import functools
import itertools
import math
import struct
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from qcore.observers.base import DEFAULT_EPS, PER_TENSOR_QSCHEMES, ObserverBase, per_tensor_qparams_float32

__all__ = ["HistogramObserver"]

#: Quantile step of torch.ao's search.
_STEP = 1e-5
_FLOAT32 = struct.Struct("f")
#: Candidates whose errors are computed together (8 covers most real activations, which stop
#: within 9 candidates); doubles while the search goes on.
_FIRST_BATCH = 8
_MAX_BATCH = 256
#: torch reduces tensors smaller than its grain size (32768 elements) on one thread.
_SUM_GRAIN = 32767
#: Inputs up to this size are counted with numpy (torch's elementwise kernels stay on one thread
#: below 32768 elements; torch.histc already splits above 200).
_HOST_COUNT_LIMIT = 32768
#: Below this histogram range (bins * bin_width) every float32 term of the error stays finite
#: (distances to a destination bin centre are at most twice the range; their cubes stay below
#: float32's maximum), so a bin without data contributes exactly 0 and can be skipped.
_FINITE_TERMS_RANGE = 1e12


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (how torch compares a float32 tensor with a Python float)."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


@functools.lru_cache(maxsize=1)
def _quantile_steps() -> tuple[list[float], list[float]]:
    """alpha_k and beta_k of torch.ao's search, accumulated step by step as its loop does.

    alpha_k = 0 + step + ... + step (k times), beta_k = 1 - step - ... - step; the loop runs while
    alpha < beta, so fewer than 1 / step + 2 of each are ever needed.
    """
    count = int(1 / _STEP) + 8
    steps = np.full(count + 1, _STEP)
    steps[0] = 0.0
    alphas = np.add.accumulate(steps).tolist()  # accumulate adds one element at a time
    steps[0] = 1.0
    betas = np.subtract.accumulate(steps).tolist()
    return alphas, betas


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


def _candidate_ranges(cum: Sequence[float], total: float) -> Iterator[tuple[int, int]]:
    """The (start_bin, end_bin) ranges torch.ao's search evaluates, in order.

    ``cum`` is the float32 cumulative histogram (a sequence of Python floats), ``total`` its sum.
    Each step of torch.ao's loop moves ``alpha`` up (start bin to the ``alpha`` quantile) or
    ``beta`` down (end bin to the ``beta`` quantile), whichever side moves further; steps that
    move no bin are skipped. The sequence does not depend on the errors: the search just stops at
    the first range whose error is larger than the previous one.
    """
    alphas, betas = _quantile_steps()
    last = len(betas) - 1
    a = b = 0
    start, end = 0, len(cum) - 1
    while alphas[a] < betas[b] and a < last and b < last:
        alpha_threshold = _to_float32(alphas[a + 1] * total)
        beta_threshold = _to_float32(betas[b + 1] * total)
        # first bin in [start, end) whose cumulative count reaches the alpha quantile (else end)
        left = bisect.bisect_left(cum, alpha_threshold, start, end)
        # last bin in (start, end] whose cumulative count is within the beta quantile (else start)
        right = bisect.bisect_right(cum, beta_threshold, start + 1, end + 1) - 1
        if left - start > end - right:
            start = left
            a += 1
        elif right < end:
            end = right
            b += 1
        else:
            # Neither bin moves (left == start, right == end): torch.ao lowers beta a step at a
            # time until the end bin moves. Jump to that step: the first k > b whose threshold
            # falls below cum[end] (thresholds only decrease with k).
            if start == end:
                return
            b = _first_step_below(betas, b + 1, last, total, cum[end]) - 1
            continue
        yield start, end


def _first_step_below(betas: list[float], first: int, last: int, total: float, count: float) -> int:
    """The smallest k in [first, last] with ``float32(betas[k] * total) < count``, else last + 1.

    The thresholds only decrease with k. ``betas[k]`` is ``1 - k * step`` up to rounding errors
    far below one step, which gives the answer to within a step or two; the walk from there
    checks the exact condition, so the result is the one a step-by-step scan finds.
    """

    def below(k: int) -> bool:
        return _to_float32(betas[k] * total) < count

    k = first
    if total > 0.0:
        k = min(max(int((1.0 - count / total) / _STEP), first), last + 1)
    while k > first and below(k - 1):
        k -= 1
    while k <= last and not below(k):
        k += 1
    return k


def _floor_divide(numer: np.ndarray, denom: np.ndarray, known_zeros: int) -> np.ndarray:
    """``torch.div(numer, denom, rounding_mode="floor")`` for float32, bit for bit, but fast.

    torch's floor division returns the exact floor of the quotient. ``floor(numer / denom)`` is
    that too unless the rounded quotient is an integer, where rounding may have crossed it;
    those elements are redone with numpy's floor division, which uses torch's algorithm.
    ``known_zeros`` zero numerators (quotient 0, already exact) are not worth redoing.
    """
    quotient = numer / denom
    result = np.floor(quotient)
    exact = quotient == result
    if np.count_nonzero(exact) > known_zeros:
        suspects = np.flatnonzero(exact)
        denoms = np.broadcast_to(denom, numer.shape).reshape(-1)
        result.reshape(-1)[suspects] = np.floor_divide(numer.reshape(-1)[suspects], denoms[suspects])
    return result


@functools.lru_cache(maxsize=8)
def _bin_indices(bins: int) -> np.ndarray:
    return np.arange(bins, dtype=np.float32)


#: Sign and offset of the two edges of a source bin: torch.ao's error of the part of a source
#: bin in its first destination bin is ``h^3 - d^3``, in its last one ``d^3 + h^3``; the centre of
#: the first destination bin is ``(bin + 0.5) * width``, of the last ``bin * width + h``.
_EDGE_SIGN = np.array([-1.0, 1.0], dtype=np.float32).reshape(2, 1, 1)
_EDGE_BIN_OFFSET = np.array([0.5, 0.0], dtype=np.float32).reshape(2, 1, 1)


class _RangeErrors:
    """torch.ao's ``_compute_quantization_error(start, end)`` over one histogram, for many
    candidate ranges at once.

    One row per candidate range; every operation is the float32 operation torch.ao performs for
    that candidate (Python scalars rounded to float32 as torch does), so each row's sum is
    bit-identical to torch.ao's error for that range. Bins without data add exactly 0 to every
    error as long as all terms stay finite (``skip_empty``); they are then left out of the
    arithmetic, though each row is still summed over all bins, in torch's order.
    """

    def __init__(self, density: np.ndarray, bin_width: float, dst_nbins: int, skip_empty: bool) -> None:
        self.bins = density.shape[0]
        self.bin_width = bin_width
        self.width = np.float32(bin_width)
        self.dst_nbins = dst_nbins
        self.columns: Optional[np.ndarray] = None
        self.indices, self.values = _bin_indices(self.bins), density
        if skip_empty:
            columns = np.flatnonzero(density)
            # gathering the bins with data and scattering their terms back pays off when few have
            if columns.shape[0] <= self.bins // 2:
                self.columns = columns
                self.indices, self.values = columns.astype(np.float32), density[columns]
                # has_data[s]: bin s has data; has_data[s - 1] for s = 0 reads the False at the end
                self.has_data = np.zeros(self.bins + 1, dtype=bool)
                self.has_data[columns] = True

    def errors(self, starts: list[int], ends: list[int]) -> list[float]:
        f32 = np.float32
        count = len(starts)
        # torch.ao computes the destination bin width with Python floats, then uses it as float32
        dst_width64 = [(e - s + 1) * self.bin_width / self.dst_nbins for s, e in zip(starts, ends)]
        dst_width = np.array(dst_width64, dtype=f32).reshape(count, 1)
        half = np.array([w / 2 for w in dst_width64], dtype=f32).reshape(count, 1)
        half_cubed = half * half
        half_cubed *= half
        # the term of a fully covered destination bin: (h^3 - (-h)^3) / 3, and (-h)^3 == -(h^3)
        full_bin = half_cubed + half_cubed
        full_bin /= f32(3)
        first = np.array(starts, dtype=np.int64)
        # each row has a zero edge where its start bin begins and, unless it starts at bin 0, one
        # where the bin before ends; those quotients are exact already
        if self.columns is None:
            zero_edges = 2 * count - starts.count(0)
        else:
            zero_edges = int(np.count_nonzero(self.has_data[first])) + int(np.count_nonzero(self.has_data[first - 1]))
        # edges[0] / edges[1]: where each source bin begins / ends, measured from the range start
        edges = np.empty((2, count, self.indices.shape[0]), dtype=f32)
        np.subtract(self.indices, first.astype(f32).reshape(count, 1), out=edges[0])
        edges[0] *= self.width
        np.add(edges[0], self.width, out=edges[1])
        # the destination bin each edge falls in
        dst_bins = _floor_divide(edges, dst_width, zero_edges)
        np.maximum(dst_bins, f32(0), out=dst_bins)
        np.minimum(dst_bins, f32(self.dst_nbins - 1), out=dst_bins)
        # distance of each edge from the centre of its destination bin
        centres = dst_bins + _EDGE_BIN_OFFSET
        centres *= dst_width
        centres[1] += half
        np.subtract(edges, centres, out=edges)
        # error of the part of the source bin in its first / last destination bin
        parts = np.multiply(edges, edges, out=centres)
        parts *= edges
        parts *= _EDGE_SIGN
        parts += half_cubed
        parts /= f32(3)
        parts *= self.values
        # plus the destination bins it covers completely
        norm = np.subtract(dst_bins[1], dst_bins[0], out=dst_bins[1])
        norm -= f32(1)
        np.multiply(self.values, full_bin, out=edges[0])
        norm *= edges[0]
        np.add(parts[0], norm, out=norm)
        norm += parts[1]
        if self.columns is not None:
            rows = np.zeros((count, self.bins), dtype=f32)
            rows[:, self.columns] = norm
            norm = rows
        # torch.ao sums each candidate's errors with torch.sum over the float32 values of all
        # bins; sum rows the same way, a few rows at a time so that torch does not split the
        # reduction across threads.
        sums = torch.from_numpy(norm)
        step = max(1, _SUM_GRAIN // self.bins)
        if count <= step:
            return sums.sum(dim=1).tolist()
        return [error for i in range(0, count, step) for error in sums[i : i + step].sum(dim=1).tolist()]


def _quantization_errors(
    density: np.ndarray,
    bin_width: float,
    dst_nbins: int,
    starts: list[int],
    ends: list[int],
    skip_empty: bool = False,
) -> list[float]:
    """torch.ao's quantization errors of the ranges ``zip(starts, ends)`` (see :class:`_RangeErrors`)."""
    with np.errstate(all="ignore"):
        return _RangeErrors(density, bin_width, dst_nbins, skip_empty).errors(starts, ends)


def search_bin_range(histogram: torch.Tensor, bin_width: float, dst_nbins: int) -> tuple[int, int]:
    """The (start_bin, end_bin) torch.ao's ``_non_linear_param_search`` ends with.

    ``bin_width`` is ``(max_val.item() - min_val.item()) / bins`` (a Python float).
    """
    bins = histogram.numel()
    hist = histogram.detach()
    if hist.device.type != "cpu" or hist.dtype != torch.float32:
        hist = hist.to("cpu", torch.float32)  # the search is torch.ao's float32 arithmetic
    # the cumulative counts as an array of float32 values, which bisect reads as Python floats
    cum = array.array("f", torch.cumsum(hist, dim=0).numpy().tobytes())
    ranges = _candidate_ranges(cum, torch.sum(hist).item())
    start, end = 0, bins - 1
    if bin_width == 0.0:
        # every error is 0.0 (torch.ao's shortcut), so no range is ever rejected
        for start, end in ranges:
            pass
        return start, end
    with np.errstate(all="ignore"):
        counts = hist.numpy()
        density = counts / np.float32(bin_width)
        range_errors = _RangeErrors(density, bin_width, dst_nbins, bins * bin_width < _FINITE_TERMS_RANGE)
        previous = math.inf
        batch = _FIRST_BATCH
        while True:
            candidates = list(itertools.islice(ranges, batch))
            if not candidates:
                return start, end
            errors = range_errors.errors([c[0] for c in candidates], [c[1] for c in candidates])
            for (next_start, next_end), error in zip(candidates, errors):
                if error > previous:
                    return start, end
                previous = error
                start, end = next_start, next_end
            batch = min(batch * 2, _MAX_BATCH)


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
            mid_points = fine_edges.numpy() + np.float32(0.5) * fine_width.numpy()
            assignment = np.searchsorted(boundaries.numpy(), mid_points, side="right") - 1
            np.clip(assignment, 0, self.bins - 1, out=assignment)
            return torch.bincount(torch.from_numpy(assignment), weights=fine_counts, minlength=self.bins)
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
        return torch.tensor(new_min, device=device), torch.tensor(new_max, device=device)

    def _search_range(self, min_val: float, max_val: float) -> tuple[np.float32, np.float32]:
        """:meth:`_non_linear_param_search` as float32 numpy scalars."""
        start, end = search_bin_range(self.histogram, (max_val - min_val) / self.bins, self.dst_nbins)
        # torch.ao's float32 arithmetic: bin_width = (max - min) / bins, new_min = min + bin_width *
        # start, new_max = min + bin_width * (end + 1); done on numpy scalars (same IEEE operations)
        f32 = np.float32
        with np.errstate(all="ignore"):
            bin_width = (f32(max_val) - f32(min_val)) / f32(self.bins)
            new_min = f32(min_val) + bin_width * f32(start)
            new_max = f32(min_val) + bin_width * f32(end + 1)
        return new_min, new_max

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` of shape ``[1]``; the defaults 1.0 and 0 before any data."""
        min_val, max_val = self.min_val.item(), self.max_val.item()
        if min_val == math.inf and max_val == -math.inf:
            warnings.warn(
                f"{self._who()}: calculate_qparams called before the observer saw any data; "
                "returning the default scale 1.0 and zero point 0",
                stacklevel=2,
            )
            device = self.min_val.device.type
            return torch.tensor([1.0], device=device), torch.tensor([0], device=device)
        if self.histogram.numel() != self.bins:
            raise ValueError(
                f"{self._who()}: the histogram has {self.histogram.numel()} bins, expected {self.bins}"
            )
        eps = self.eps
        if (
            self.qscheme in PER_TENSOR_QSCHEMES
            and self.min_val.device.type == "cpu"
            and eps.device.type == "cpu"
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
                eps=np.float32(eps.item()),
                has_customized_qrange=self.has_customized_qrange,
                who=self._who(),
            )
        new_min, new_max = self._non_linear_param_search()
        return self._calculate_qparams(new_min, new_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, min_val={self.min_val}, max_val={self.max_val}"
