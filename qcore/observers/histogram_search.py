"""The range search of :class:`~qcore.observers.HistogramObserver`: torch.ao's result, fast.

torch.ao's ``HistogramObserver._non_linear_param_search`` walks a (start_bin, end_bin) range
inward by quantile steps of 1e-5 and stops at the first candidate range whose L2 quantization
error (``_compute_quantization_error``, a float32 computation over every bin) is larger than
the previous one. This module finds the same (start_bin, end_bin), bit for bit:

* :func:`candidate_ranges` walks the quantiles with binary searches on the cumulative histogram
  and skips the steps that move no bin (torch.ao indexes one cumulative-count element per
  Python iteration);
* the search only needs the *sign* of each step's error change, so it first estimates the
  errors of a batch of candidates in float64 from a closed form (:class:`EstimatedErrors`, a
  few numpy passes), and trusts the estimate where two neighbouring errors differ by more than
  torch.ao's own float32 rounding can move them (a bound, computed for the two rows of a step
  only when their estimates are within :data:`COARSE_TOLERANCE`);
* that estimated search runs compiled (``_search_kernel.c``, one candidate at a time, built
  with the package where a C compiler is available); it hands a step too close to call back to
  the numpy search below, which also runs alone where the package was built without a compiler;
* only near such a tie are the two errors computed exactly (:class:`FloorDivErrors`), one row
  per candidate, with every float32 operation torch.ao performs for that candidate (so each
  row sums to torch.ao's error exactly), the begin and end edge of every bin in one stacked
  array, and bins without data left out of the arithmetic when most bins are empty.

For one candidate range ``[s, e]`` (``L = e - s + 1`` source bins, ``D`` destination bins of
width ``w = bin_width * L / D``), torch.ao's per-bin error is::

    density * ((h^3 - d_b^3) / 3 + (k_e - k_b - 1) * (h^3 + h^3) / 3 + (d_e^3 + h^3) / 3)

with ``h = w / 2``, ``k_b``/``k_e`` the (clamped) destination bins of the bin's begin/end edge
and ``d_b``/``d_e`` the distance of that edge from the centre of its destination bin.
"""

from __future__ import annotations

import bisect
import functools
import math
from array import array
from types import ModuleType
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from qcore.observers.base import to_float32

_search_kernel: Optional[ModuleType]
try:  # the estimated search, compiled (built with the package when a C compiler is available)
    from qcore.observers import _search_kernel
except ImportError:  # pragma: no cover - built without a compiler: the numpy search does the same
    _search_kernel = None

__all__ = [
    "EstimatedErrors",
    "BOUND_MARGIN",
    "COARSE_TOLERANCE",
    "FloorDivErrors",
    "candidate_ranges",
    "quantile_steps",
    "quantization_errors",
    "search_bin_range",
    "to_float32",
]

#: Quantile step of torch.ao's search.
_STEP = 1e-5
#: Candidates whose errors are computed together at first; the batch grows while the search
#: goes on. Dense activations stop within 3 to 8 candidates; a batch costs mostly its fixed
#: number of numpy calls, so a few spare candidates are cheaper than a second batch.
_FIRST_BATCH = 8
#: The float64 estimates cost in proportion to the candidates: a smaller first batch.
_FIRST_ESTIMATE_BATCH = 4
_MAX_BATCH = 64
#: torch reduces tensors smaller than its grain size (32768 elements) on one thread.
_SUM_GRAIN = 32767
#: Below this histogram range (bins * bin_width) every float32 term of the error stays finite
#: (distances to a destination bin centre are at most twice the range; their cubes stay below
#: float32's maximum), so a bin without data contributes exactly 0 and can be skipped.
_FINITE_TERMS_RANGE = 1e12
#: How far from its estimate torch.ao's float32 error of a range may be, in bounds
#: (:class:`EstimatedErrors`; the largest deviation measured was 1.2 bounds).
BOUND_MARGIN = 4.0
#: torch's float32 sum over 2048 positive terms: ~11 roundings of the partial sums at most.
SUM_TOLERANCE = 2e-6
_FLOAT32_EPS = 2.0**-24
#: Neighbouring estimates further apart than this fraction of the larger one are trusted without
#: computing their bounds: the largest bound measured was 4.6e-4 of its error (torch.ao's float32
#: error of a range with 2048 bins is within ~2^-23 * 2048 = 2.4e-4 of exact from its rounded bin
#: edges, plus the rounding of its cubes), so two errors move apart by at most ~1e-3.
COARSE_TOLERANCE = 4e-3
#: The estimate is used when every float32 term of torch.ao's error is a normal number: a histogram range
#: (bins * bin_width) within these bounds.
_ESTIMATE_RANGE = (1e-12, 1e12)


# ----------------------------------------------------------------------------- the candidates
@functools.lru_cache(maxsize=1)
def quantile_steps() -> tuple[list[float], list[float]]:
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


@functools.lru_cache(maxsize=1)
def _quantile_step_arrays() -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantile_steps` as float64 arrays (for the compiled search)."""
    alphas, betas = quantile_steps()
    return np.array(alphas), np.array(betas)


def candidate_ranges(cum: Sequence[float], total: float) -> Iterator[tuple[int, int]]:
    """The (start_bin, end_bin) ranges torch.ao's search evaluates, in order.

    ``cum`` is the float32 cumulative histogram (a sequence of Python floats), ``total`` its sum.
    Each step of torch.ao's loop moves ``alpha`` up (start bin to the ``alpha`` quantile) or
    ``beta`` down (end bin to the ``beta`` quantile), whichever side moves further; steps that
    move no bin are skipped. The sequence does not depend on the errors: the search just stops at
    the first range whose error is larger than the previous one.
    """
    alphas, betas = quantile_steps()
    last = len(betas) - 1
    a = b = 0
    start, end = 0, len(cum) - 1
    while alphas[a] < betas[b] and a < last and b < last:
        alpha_threshold = to_float32(alphas[a + 1] * total)
        beta_threshold = to_float32(betas[b + 1] * total)
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
        return to_float32(betas[k] * total) < count

    k = first
    if total > 0.0:
        k = min(max(int((1.0 - count / total) / _STEP), first), last + 1)
    while k > first and below(k - 1):
        k -= 1
    while k <= last and not below(k):
        k += 1
    return k


# ----------------------------------------------------------------------------- the errors
def _sum_rows(norm: np.ndarray) -> list[float]:
    """Each row's ``torch.sum``, as torch.ao sums one candidate's float32 errors over all bins.

    A few rows at a time, so that torch does not split a reduction across threads.
    """
    sums = torch.from_numpy(norm)
    count, bins = norm.shape
    step = max(1, _SUM_GRAIN // bins)
    if count <= step:
        return sums.sum(dim=1).tolist()
    return [error for i in range(0, count, step) for error in sums[i : i + step].sum(dim=1).tolist()]


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
def _bin_indices(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.float32)


#: Sign and offset of the two edges of a source bin: torch.ao's error of the part of a source
#: bin in its first destination bin is ``h^3 - d^3``, in its last one ``d^3 + h^3``; the centre of
#: the first destination bin is ``(bin + 0.5) * width``, of the last ``bin * width + h``.
_EDGE_SIGN = np.array([-1.0, 1.0], dtype=np.float32).reshape(2, 1, 1)
_EDGE_BIN_OFFSET = np.array([0.5, 0.0], dtype=np.float32).reshape(2, 1, 1)


def _candidate_widths(
    bin_width: float, dst_nbins: int, starts: list[int], ends: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """torch.ao's destination bin width of each candidate (a Python float, as it computes it)
    and its half, as float32 columns (how torch uses them in tensor arithmetic)."""
    widths = [bin_width * (e - s + 1) / dst_nbins for s, e in zip(starts, ends)]
    columns = np.array([widths, [w / 2 for w in widths]], dtype=np.float32)
    return columns[0].reshape(-1, 1), columns[1].reshape(-1, 1)


class FloorDivErrors:
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
        dst_width, half = _candidate_widths(self.bin_width, self.dst_nbins, starts, ends)
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
        return _sum_rows(norm)


def _edges_and_minus_ones(edges: np.ndarray) -> np.ndarray:
    """Rows (edge, -1): a range's (scale, offset) times this is ``edge * scale - offset`` per edge."""
    stacked = np.empty((2, edges.shape[0]))
    stacked[0] = edges
    stacked[1] = -1.0
    return stacked


@functools.lru_cache(maxsize=8)
def _all_edges_and_minus_ones(count: int) -> np.ndarray:
    stacked = _edges_and_minus_ones(np.arange(count, dtype=np.float64))
    stacked.flags.writeable = False  # shared between histograms
    return stacked


class EstimatedErrors:
    """torch.ao's quantization errors of many candidate ranges, estimated in float64, each with
    a bound on how far torch.ao's float32 result can be from the estimate.

    Every source bin spreads its count evenly over its width, so the error of a range is
    ``sum_i density_i * (G(x_i+1) - G(x_i))`` over the bin edges ``x_i``, with ``G`` the
    antiderivative of the squared distance to the nearest (clamped) destination bin centre. In
    units of the destination bin width ``D``, with ``t = x / D``, ``k = clamp(floor(t), 0, D-1)``
    and ``u = t - k - 1/2``: ``G = D^3 * (k / 12 + u^3 / 3 + 1/24)``. Regrouped by edge, the
    error is ``G`` at each edge times the density change across it (the 1/24 terms cancel)::

        error = D^3 * (k @ jumps / 12 + u^3 @ jumps / 3)

    The float64 sum is exact to ~1e-10. torch.ao's float32 arithmetic is not: a bin's error is a
    difference of two cubed distances ``d`` (of its edges from a destination bin centre), each
    rounded (``eps * |d|^3``), and its edges ``x`` are rounded (``eps * d^2 * |x|``), with
    ``eps = 2^-24``. Summed over both edges of every bin, in the same units::

        bound = D^3 * eps * (|u|^3 + u^2 * |t|) @ (density left + density right of each edge)

    Over 190,000 candidate ranges of 2,700 random histograms, torch.ao's error was never further
    from the estimate than 1.2 bounds; :data:`BOUND_MARGIN` times the bound (plus torch's float32
    summation error, :data:`SUM_TOLERANCE` of the error) is what the search trusts.
    """

    def __init__(self, counts: np.ndarray, bin_width: float, dst_nbins: int) -> None:
        density = counts.astype(np.float64) / bin_width
        size = density.shape[0] + 1
        jumps = np.zeros(size)
        jumps[1:] = density  # the density left of edge m ...
        jumps[:-1] -= density  # ... minus the density right of it
        self.density = density
        self.edge_index: Optional[np.ndarray] = None  # None: every edge; else the edges next to data
        self._touching: Optional[np.ndarray] = None
        if np.count_nonzero(density) <= size // 2:
            touching = self.touching
            edge_index = np.flatnonzero(touching)
            if edge_index.shape[0] <= size // 2:
                # sparse: only the edges next to data carry a jump or touch data
                self.edge_index, self._touching = edge_index, touching[edge_index]
                jumps = jumps[edge_index]
        # dense: gathering the edges next to data costs more than it saves
        if self.edge_index is None:
            self.edges_and_minus_ones = _all_edges_and_minus_ones(size)
        else:
            self.edges_and_minus_ones = _edges_and_minus_ones(self.edge_index.astype(np.float64))
        # the two weights of the estimate, 1/12 for k and 1/3 for u^3, folded into the jumps
        self.jumps_12 = jumps / 12.0
        self.jumps_3 = jumps / 3.0
        self.bin_width = bin_width
        self.dst_nbins = dst_nbins

    @property
    def touching(self) -> np.ndarray:
        """Per edge: the density left of it plus the density right of it (for the bounds)."""
        if self._touching is None:
            density = self.density
            touching = np.zeros(density.shape[0] + 1)
            touching[1:] = density
            touching[:-1] += density
            self._touching = touching if self.edge_index is None else touching[self.edge_index]
        return self._touching

    def errors(
        self, starts: list[int], ends: list[int], with_bounds: bool = False
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The estimated errors of the ranges ``zip(starts, ends)``, and their bounds if asked."""
        batch = self.batch(starts, ends)
        return batch.estimates, (batch.bounds() if with_bounds else None)

    def batch(self, starts: list[int], ends: list[int]) -> "EstimateBatch":
        """The estimated errors of the ranges ``zip(starts, ends)``; each bound on demand."""
        n = self.dst_nbins
        count = len(starts)
        # per range: its scale (destination bins per source bin) and offset, (start * scale + 1/2)
        coefficients = np.empty((count, 2))
        coefficients[:, 0] = starts
        length = np.array(ends, dtype=np.float64)
        length -= coefficients[:, 0]
        length += 1.0
        np.divide(n, length, out=coefficients[:, 1])
        coefficients[:, 0] *= coefficients[:, 1]
        coefficients[:, 0] += 0.5
        coefficients = coefficients[:, ::-1]  # (scale, offset)
        # u + k = t - 1/2, with t = (edge - start) * scale; k = clamp(floor(t)) is
        # clamp(rint(t - 1/2)) except where t is an integer, at which G is continuous (either k
        # gives the same k / 12 + u^3 / 3)
        u = coefficients @ self.edges_and_minus_ones
        k = np.rint(u)
        np.clip(k, 0.0, n - 1.0, out=k)
        u -= k
        u_squared = u * u
        u_cubed = u_squared * u
        length *= self.bin_width / n
        dst_width_cubed = length * length
        dst_width_cubed *= length
        estimates = k @ self.jumps_12
        estimates += u_cubed @ self.jumps_3
        estimates *= dst_width_cubed
        return EstimateBatch(estimates, u, k, u_squared, dst_width_cubed, self)


class EstimateBatch:
    """The estimates of a batch of candidate ranges (``estimates``), and the bound of a row,
    computed from the batch's arrays when asked (``bound``; ``bounds`` for every row)::

        bound = D^3 * eps * (|u|^3 + u^2 * |t|) @ touching,   t = u + k + 1/2
    """

    def __init__(
        self,
        estimates: np.ndarray,
        u: np.ndarray,
        k: np.ndarray,
        u_squared: np.ndarray,
        dst_width_cubed: np.ndarray,
        source: EstimatedErrors,
    ) -> None:
        self.estimates = estimates
        self.u, self.k, self.u_squared = u, k, u_squared
        self.dst_width_cubed = dst_width_cubed
        self.source = source
        self._bounds: dict[int, float] = {}

    def _terms(self, rows: slice | int) -> np.ndarray:
        u, u_squared = self.u[rows], self.u_squared[rows]
        terms = self.k[rows] + u
        terms += 0.5
        np.abs(terms, out=terms)
        terms *= u_squared  # u^2 * |t|
        cubes = np.abs(u)
        cubes *= u_squared  # |u|^3
        terms += cubes
        return terms

    def bound(self, row: int) -> float:
        """The bound of row ``row``'s estimate."""
        if row not in self._bounds:
            scale = float(self.dst_width_cubed[row]) * _FLOAT32_EPS
            self._bounds[row] = scale * float(self._terms(row) @ self.source.touching)
        return self._bounds[row]

    def bound_pair(self, row: int) -> tuple[float, float]:
        """The bounds of rows ``row`` and ``row + 1`` (one pass over both when neither is known)."""
        if row in self._bounds or row + 1 in self._bounds:
            return self.bound(row), self.bound(row + 1)
        rows = slice(row, row + 2)
        pair = self.dst_width_cubed[rows] * _FLOAT32_EPS * (self._terms(rows) @ self.source.touching)
        self._bounds[row], self._bounds[row + 1] = pair.tolist()
        return self._bounds[row], self._bounds[row + 1]

    def bounds(self) -> np.ndarray:
        """The bounds of every row."""
        return self.dst_width_cubed * _FLOAT32_EPS * (self._terms(slice(None)) @ self.source.touching)


def quantization_errors(
    density: np.ndarray,
    bin_width: float,
    dst_nbins: int,
    starts: list[int],
    ends: list[int],
    skip_empty: bool = False,
) -> list[float]:
    """torch.ao's quantization errors of the ranges ``zip(starts, ends)``, bit for bit
    (:class:`FloorDivErrors`; ``skip_empty`` leaves bins without data out of the arithmetic)."""
    with np.errstate(all="ignore"):
        return FloorDivErrors(density, bin_width, dst_nbins, skip_empty).errors(starts, ends)


# ----------------------------------------------------------------------------- the search
def search_bin_range(histogram: torch.Tensor, bin_width: float, dst_nbins: int) -> tuple[int, int]:
    """The (start_bin, end_bin) torch.ao's ``_non_linear_param_search`` ends with.

    ``bin_width`` is ``(max_val.item() - min_val.item()) / bins`` (a Python float).
    """
    bins = histogram.numel()
    hist = histogram.detach() if histogram.requires_grad else histogram
    if not hist.is_cpu or hist.dtype != torch.float32:
        hist = hist.to("cpu", torch.float32)  # the search is torch.ao's float32 arithmetic
    total = torch.sum(hist).item()
    if _search_kernel is not None and bin_width != 0.0 and _ESTIMATE_RANGE[0] < bins * bin_width < _ESTIMATE_RANGE[1]:
        alphas, betas = _quantile_step_arrays()
        counts = hist.numpy()
        found = _search_kernel.search(
            counts if counts.flags.c_contiguous else np.ascontiguousarray(counts), total, bin_width, dst_nbins,
            alphas, betas, BOUND_MARGIN, SUM_TOLERANCE, COARSE_TOLERANCE,
        )
        if found is not None:
            return found
        # a near tie (or an estimate that is not finite): the search below decides it
    return _search_bin_range_in_python(hist, total, bin_width, dst_nbins)


def _search_bin_range_in_python(hist: torch.Tensor, total: float, bin_width: float, dst_nbins: int) -> tuple[int, int]:
    """:func:`search_bin_range` with numpy: estimates first, torch.ao's exact errors at near ties."""
    bins = hist.numel()
    # the cumulative counts as an array of float32 values, which bisect reads as Python floats
    cum = array("f", torch.cumsum(hist, dim=0).numpy().tobytes())
    ranges = candidate_ranges(cum, total)
    start, end = 0, bins - 1
    if bin_width == 0.0:
        # every error is 0.0 (torch.ao's shortcut), so no range is ever rejected
        for start, end in ranges:
            pass
        return start, end
    with np.errstate(all="ignore"):
        counts = hist.numpy()

        def exact_kernel() -> FloorDivErrors:
            density = counts / np.float32(bin_width)
            return FloorDivErrors(density, bin_width, dst_nbins, bins * bin_width < _FINITE_TERMS_RANGE)

        if _ESTIMATE_RANGE[0] < bins * bin_width < _ESTIMATE_RANGE[1]:
            estimate = EstimatedErrors(counts, bin_width, dst_nbins)
            found = _search_with_estimated_errors(ranges, estimate, exact_kernel, bins)
            if found is not None:
                return found
            ranges = candidate_ranges(cum, total)  # start over, with exact errors only
        return _search_with_exact_errors(ranges, exact_kernel(), bins)


def _next_batch(ranges: Iterator[tuple[int, int]], size: int) -> tuple[list[int], list[int]]:
    starts, ends = [], []
    for next_start, next_end in ranges:
        starts.append(next_start)
        ends.append(next_end)
        if len(starts) == size:
            break
    return starts, ends


def _search_with_exact_errors(
    ranges: Iterator[tuple[int, int]], kernel: FloorDivErrors, bins: int
) -> tuple[int, int]:
    """torch.ao's loop over the candidates: stop at the first error above the previous one."""
    start, end = 0, bins - 1
    previous = math.inf
    batch = _FIRST_BATCH
    while True:
        starts, ends = _next_batch(ranges, batch)
        if not starts:
            return start, end
        for next_start, next_end, error in zip(starts, ends, kernel.errors(starts, ends)):
            if error > previous:
                return start, end
            previous = error
            start, end = next_start, next_end
        batch = min(batch * 2, _MAX_BATCH)


def _search_with_estimated_errors(
    ranges: Iterator[tuple[int, int]],
    estimate: EstimatedErrors,
    exact_kernel: Callable[[], FloorDivErrors],
    bins: int,
) -> Optional[tuple[int, int]]:
    """torch.ao's loop over the candidates, deciding each step on the float64 estimates where
    two neighbouring errors differ by more than torch.ao's float32 rounding can move them (first
    a coarse test, then the two ranges' bounds), and on torch.ao's exact float32 errors of the
    two ranges where they do not. None if an estimate is not finite (a case it does not cover)."""
    start, end = 0, bins - 1
    previous_estimate = math.inf
    previous: Optional[tuple[EstimateBatch, int]] = None  # the batch and row of (start, end)
    exact: Optional[FloorDivErrors] = None  # built at the first near tie
    size, next_size = _FIRST_ESTIMATE_BATCH, _FIRST_ESTIMATE_BATCH
    while True:
        starts, ends = _next_batch(ranges, size)
        if not starts:
            return start, end
        batch = estimate.batch(starts, ends)
        estimates = batch.estimates.tolist()
        if not math.isfinite(sum(estimates)):  # an estimate is not finite (or they overflow)
            return None
        for row, (next_start, next_end, error) in enumerate(zip(starts, ends, estimates)):
            larger = error > previous_estimate
            difference = abs(error - previous_estimate)
            if previous is not None and difference <= COARSE_TOLERANCE * max(error, previous_estimate):
                # close: bound how far torch.ao's float32 errors can be from these two estimates
                previous_batch, previous_row = previous
                if previous_batch is batch:  # the rows before and at this step: one pass
                    previous_bound, bound = batch.bound_pair(previous_row)
                else:
                    previous_bound, bound = previous_batch.bound(previous_row), batch.bound(row)
                slack = BOUND_MARGIN * (previous_bound + bound)
                slack += SUM_TOLERANCE * (abs(previous_estimate) + abs(error))
                if not math.isfinite(slack) or difference <= slack:
                    # too close to call: torch.ao's own float32 errors decide
                    exact = exact or exact_kernel()
                    previous_exact, exact_error = exact.errors([start, next_start], [end, next_end])
                    larger = exact_error > previous_exact
            if larger:
                return start, end
            previous_estimate = error
            previous = (batch, row)
            start, end = next_start, next_end
        size, next_size = next_size, min(size + next_size, _MAX_BATCH)  # 4, 4, 8, 12, 20, ...
