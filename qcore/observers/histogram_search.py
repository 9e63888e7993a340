"""The range search of :class:`~qcore.observers.HistogramObserver`: torch.ao's result, fast.

torch.ao's ``HistogramObserver._non_linear_param_search`` walks a (start_bin, end_bin) range
inward by quantile steps of 1e-5 and stops at the first candidate range whose L2 quantization
error (``_compute_quantization_error``, a float32 computation over every bin) is larger than
the previous one. This module finds the same (start_bin, end_bin), bit for bit:

* :func:`candidate_ranges` walks the quantiles with binary searches on the cumulative histogram
  and skips the steps that move no bin (torch.ao indexes one cumulative-count element per
  Python iteration);
* the errors of a batch of candidates are computed at once, one row per candidate, with every
  float32 operation torch.ao performs for that candidate (so each row sums to torch.ao's error
  exactly); :class:`GridErrors` takes the destination bin of each source bin edge from the
  exact grid ``floor(m * D / L)`` instead of a float32 floor division (see its docstring for why
  that is torch's answer), shares it between the bin ending and the bin beginning at the edge,
  and treats the start and end edge of every bin in one stacked array;
  :class:`FloorDivErrors` does torch's floor divisions and serves the histograms outside the
  grid's proven range (e.g. int16's 65536 destination bins).

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
import struct
from array import array
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

__all__ = [
    "FloorDivErrors",
    "GridErrors",
    "candidate_ranges",
    "quantile_steps",
    "quantization_errors",
    "range_errors",
    "search_bin_range",
    "to_float32",
]

#: Quantile step of torch.ao's search.
_STEP = 1e-5
_FLOAT32 = struct.Struct("f")
#: Candidates whose errors are computed together at first; the batch grows while the search
#: goes on. Dense activations stop within 3 to 8 candidates; a batch costs mostly its fixed
#: number of numpy calls, so a few spare candidates are cheaper than a second batch.
_FIRST_BATCH = 8
_MAX_BATCH = 64
#: torch reduces tensors smaller than its grain size (32768 elements) on one thread.
_SUM_GRAIN = 32767
#: Below this histogram range (bins * bin_width) every float32 term of the error stays finite
#: (distances to a destination bin centre are at most twice the range; their cubes stay below
#: float32's maximum), so a bin without data contributes exactly 0 and can be skipped.
_FINITE_TERMS_RANGE = 1e12
#: float32's unit roundoff.
_U32 = 2.0**-24


def _to_float32(value: float) -> float:
    """``value`` rounded to float32 (how torch compares a float32 tensor with a Python float)."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def to_float32(value: float) -> float:
    """``value`` rounded to float32, infinite beyond float32's range, as a Python float.

    A float32 addition, subtraction, multiplication or division is the double precision one
    rounded to float32 (double's 53 bits are enough that the two roundings never differ), so
    ``to_float32(a * b)`` is torch's float32 ``a * b`` for float32 values ``a`` and ``b``.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


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


# ----------------------------------------------------------------------------- the errors
class RangeErrors(Protocol):
    def errors(self, starts: list[int], ends: list[int]) -> list[float]:
        """torch.ao's ``_compute_quantization_error(s, e)`` for each ``(s, e)`` pair."""
        ...


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
) -> tuple[list[float], np.ndarray, np.ndarray]:
    """torch.ao's destination bin width of each candidate (a Python float, as it computes it),
    and that width and its half as float32 columns (how torch uses them in tensor arithmetic)."""
    widths = [bin_width * (e - s + 1) / dst_nbins for s, e in zip(starts, ends)]
    count = len(widths)
    width32 = np.array(widths, dtype=np.float32).reshape(count, 1)
    half32 = np.array([w / 2 for w in widths], dtype=np.float32).reshape(count, 1)
    return widths, width32, half32


class FloorDivErrors:
    """torch.ao's ``_compute_quantization_error(start, end)`` over one histogram, for many
    candidate ranges at once, for any histogram.

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
        _, dst_width, half = _candidate_widths(self.bin_width, self.dst_nbins, starts, ends)
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


def _begin_end_views(edge_values: np.ndarray) -> np.ndarray:
    """``(2, rows, bins)`` view of a ``(rows, bins + 1)`` array of per-edge values: ``[0]`` the
    value at each bin's begin edge, ``[1]`` at its end edge (the same memory, shifted by one)."""
    rows, edges = edge_values.shape
    row_stride, column_stride = edge_values.strides
    views = np.ndarray(
        (2, rows, edges - 1), edge_values.dtype, edge_values, strides=(column_stride, row_stride, column_stride)
    )
    views.flags.writeable = False
    return views


class GridErrors:
    """:class:`FloorDivErrors` with the destination bins from integer arithmetic.

    torch.ao finds the destination bin of the edge ``m`` source bins after the range start by a
    float32 floor division, ``floor(fl(m * bin_width) / fl(w))``, clamped to ``[0, D - 1]``. In
    exact arithmetic that quotient is ``t = m * D / L``, a multiple of ``1 / L``. The float32
    operands carry relative errors of a few units of roundoff ``u``, so the computed quotient is
    within ``5 u |t|`` of ``t``; wherever ``t`` is not an integer it is at least ``1 / L`` away
    from one, so while ``5 u |t| < 1 / L`` torch's floor is ``floor(t)``. Here ``floor(t)`` is
    taken from ``fl(m' * fl(D / L))`` (within ``2 u |t|`` of ``t``), with ``m`` clamped first to
    ``[0, L (1 - 1 / 2D)]`` (``t`` to ``[0, D - 1/2]``), which is the clamp of the destination bin.
    Both bounds hold for every edge the clamp does not settle anyway (``|t| <= D + 1``) when
    ``(bins + 1) * (D + 1) * 8 u < 1`` (:meth:`applies`; 2048 bins and 256 destination bins use
    a quarter of that). Where ``t`` is an integer strictly between 0 and D (``g - 1`` edges per
    candidate, ``g = gcd(D, L)``), float32 rounding decides which side torch lands on: its floor
    division (``fmod``-based, rounded to the nearest integer at the end) returns the floor of the
    exact quotient of its two float32 operands, ``n`` when ``edge >= n * w`` and ``n - 1``
    otherwise; that comparison is made exactly (in double precision) and the bins where it
    differs from ``floor(t)`` are redone. At ``t = 0`` both are 0, at ``t = D`` or beyond the clamp
    gives ``D - 1`` either way.

    Everything else is torch.ao's float32 arithmetic, operation by operation, on full rows of
    ``bins`` values (bins without data included), so each row's ``torch.sum`` is torch.ao's
    error bit for bit.
    """

    def __init__(self, density: np.ndarray, bin_width: float, dst_nbins: int) -> None:
        self.bins = density.shape[0]
        self.bin_width = bin_width
        self.width = np.float32(bin_width)
        self.dst_nbins = dst_nbins
        self.density = density
        self.edge_indices = _bin_indices(self.bins + 1)

    @staticmethod
    def applies(bins: int, bin_width: float, dst_nbins: int) -> bool:
        """True when the integer destination bins are torch's (see the class docstring) and the
        float32 positions are normal numbers (the relative error bounds hold)."""
        return (bins + 1) * (dst_nbins + 1) * 8 * _U32 < 1.0 and 2.0**-100 <= bin_width <= 2.0**100

    def errors(self, starts: list[int], ends: list[int]) -> list[float]:
        f32 = np.float32
        bins = self.bins
        columns = self._candidate_columns(starts, ends)
        dst_width, half = columns[0], columns[1]
        # m: each edge's distance from the range start, in source bins (exact in float32)
        m = np.subtract(self.edge_indices, columns[4])
        # destination bins of the begin ([0]) and end ([1]) edge of each bin: two overlapping views
        dst_bins = _begin_end_views(self._destination_bins(m, columns[2], columns[3]))
        # edges[0] / edges[1]: where each source bin begins / ends (torch.ao's src_bin_begin / end)
        edges = np.empty(dst_bins.shape, dtype=f32)
        np.multiply(m[:, :bins], self.width, out=edges[0])
        np.add(edges[0], self.width, out=edges[1])
        # the destination bins a source bin covers completely: k_e - k_b - 1
        covered = np.subtract(dst_bins[1], dst_bins[0])
        covered -= f32(1)
        # the centre of the destination bin of each begin edge ((k_b + 0.5) * w) and end edge
        # (k_e * w + h)
        centres = np.add(dst_bins, _EDGE_BIN_OFFSET)
        centres *= dst_width
        centres[1] += half
        self._redo_integer_quotients(starts, ends, columns, dst_bins, centres, covered)
        # -d_b = centre - begin and d_e = end - centre (-(x - y) is y - x in floating point too)
        np.subtract(centres[0], edges[0], out=edges[0])
        np.subtract(edges[1], centres[1], out=edges[1])
        # error of the part of the source bin in its first / last destination bin:
        # (h^3 - d_b^3) / 3 = ((-d_b)^3 + h^3) / 3 and (d_e^3 + h^3) / 3, times the density
        parts = np.multiply(edges, edges, out=centres)
        parts *= edges
        parts += columns[5]
        parts /= f32(3)
        parts *= self.density
        # plus the destination bins it covers completely, each (h^3 - (-h)^3) / 3 times the density
        covered *= np.multiply(self.density, columns[6], out=edges[0])
        norm = np.add(parts[0], covered, out=covered)
        norm += parts[1]
        return _sum_rows(norm)

    def destination_bins(self, starts: list[int], ends: list[int]) -> np.ndarray:
        """torch.ao's ``dst_bin_of_begin`` (``[0]``) and ``dst_bin_of_end`` (``[1]``) of each
        candidate range, a float32 array of shape ``(2, len(starts), bins)``."""
        columns = self._candidate_columns(starts, ends)
        m = np.subtract(self.edge_indices, columns[4])
        result = _begin_end_views(self._destination_bins(m, columns[2], columns[3])).copy()
        points = self._integer_points(starts, ends, columns)
        if points is not None:
            rows, bins, begin, end = points
            result[0, rows, bins] = begin
            result[1, rows, bins - 1] = end
        return result

    def _candidate_columns(self, starts: list[int], ends: list[int]) -> np.ndarray:
        """Per candidate, float32 columns of shape ``(count, 1)``: torch.ao's destination bin
        width ``w`` (the Python float ``bin_width * L / D``, rounded to float32 as torch uses it),
        its half ``h``, ``D / L``, the last ``m`` before the clamp (``L (1 - 1 / 2D)``), the start,
        ``h^3`` and the error of a fully covered destination bin, ``(h^3 - (-h)^3) / 3`` (both with
        torch's float32 roundings: ``fl(fl(h * h) * h)`` and ``fl(fl(h^3 + h^3) / 3)``)."""
        dst, bin_width = self.dst_nbins, self.bin_width
        lengths = [e - s + 1 for s, e in zip(starts, ends)]
        widths = [bin_width * n / dst for n in lengths]
        halves = [to_float32(w / 2) for w in widths]
        cubes = [to_float32(to_float32(h * h) * h) for h in halves]
        return np.array(
            [
                widths,
                halves,
                [dst / n for n in lengths],
                [n * (1.0 - 0.5 / dst) for n in lengths],
                starts,
                cubes,
                [to_float32((c + c) / 3) for c in cubes],
            ],
            dtype=np.float32,
        ).reshape(7, len(starts), 1)

    @staticmethod
    def _destination_bins(m: np.ndarray, ratio: np.ndarray, last: np.ndarray) -> np.ndarray:
        """``clamp(floor(m * D / L), 0, D - 1)`` for every edge (see the class docstring)."""
        t = np.maximum(m, np.float32(0))
        np.minimum(t, last, out=t)
        t *= ratio
        return np.floor(t, out=t)

    def _integer_points(
        self, starts: list[int], ends: list[int], columns: np.ndarray
    ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """torch's destination bins at the edges where ``t = m * D / L`` is an integer ``n`` in
        (0, D): ``(rows, bins, of the bin beginning there, of the bin ending there)``, or None
        when no candidate has such an edge.

        torch's floor division of positive float32 values returns the floor of their exact
        quotient, which here is ``n`` or ``n - 1`` (the operands are within a few roundoffs of
        ``t``): ``n`` exactly when ``edge >= n * w``, compared in double precision, where the
        product of a float32 and an integer below 2^16 is exact.
        """
        rows: list[int] = []
        bins: list[int] = []
        integers: list[int] = []
        for row, (start, end) in enumerate(zip(starts, ends)):
            length = end - start + 1
            common = math.gcd(self.dst_nbins, length)
            if common > 1:
                period, step = length // common, self.dst_nbins // common
                rows += [row] * (common - 1)
                bins += range(start + period, start + length, period)
                integers += range(step, self.dst_nbins, step)
        if not rows:
            return None
        row_index, bin_index = np.array(rows, dtype=np.intp), np.array(bins, dtype=np.intp)
        n = np.array(integers, dtype=np.float64)
        m = bin_index.astype(np.float32) - columns[4, row_index, 0]
        begin = m * self.width  # torch.ao's src_bin_begin there, and src_bin_end of the bin before
        end = (m - np.float32(1)) * self.width
        end += self.width
        threshold = n * columns[0, row_index, 0].astype(np.float64)
        return row_index, bin_index, n - (begin < threshold), n - (end < threshold)

    def _redo_integer_quotients(
        self,
        starts: list[int],
        ends: list[int],
        columns: np.ndarray,
        dst_bins: np.ndarray,
        centres: np.ndarray,
        covered: np.ndarray,
    ) -> None:
        """Redo the centres and covered counts of the bins whose begin or end edge torch puts in
        another destination bin than ``floor(t)`` (only possible where ``t`` is an integer)."""
        points = self._integer_points(starts, ends, columns)
        if points is None:
            return
        rows, bins, begin, end = points
        mine = dst_bins[0][rows, bins]
        begin_changed, end_changed = begin != mine, end != mine
        if not (begin_changed.any() or end_changed.any()):
            return
        f32 = np.float32
        # the bins beginning at a changed edge, with their begin/end destination bins, then the
        # bins ending at one; a bin with both edges at integer points (L divides D) appears in
        # both lists, so the second takes the first's change into account
        redo_rows, redo_bins = rows[begin_changed], bins[begin_changed]
        k_begin, k_end = begin[begin_changed], dst_bins[1][redo_rows, redo_bins]
        self._redo_bins(columns, redo_rows, redo_bins, k_begin, k_end, centres, covered)
        end_rows, end_bins = rows[end_changed], bins[end_changed] - 1
        k_begin = dst_bins[0][end_rows, end_bins]
        if redo_rows.size and end_rows.size:
            # a bin whose begin edge was changed above keeps that change
            changed_begin = dict(zip(zip(redo_rows.tolist(), redo_bins.tolist()), begin[begin_changed].tolist()))
            k_begin = np.array(
                [changed_begin.get(key, k) for key, k in zip(zip(end_rows.tolist(), end_bins.tolist()), k_begin.tolist())],
                dtype=f32,
            )
        self._redo_bins(columns, end_rows, end_bins, k_begin, end[end_changed], centres, covered)

    @staticmethod
    def _redo_bins(
        columns: np.ndarray,
        rows: np.ndarray,
        bins: np.ndarray,
        k_begin: np.ndarray,
        k_end: np.ndarray,
        centres: np.ndarray,
        covered: np.ndarray,
    ) -> None:
        """Centres and covered counts of these bins from these destination bins (torch.ao's
        float32 operations: ``(k_b + 0.5) * w``, ``k_e * w + h``, ``k_e - k_b - 1``)."""
        if not rows.size:
            return
        f32 = np.float32
        k_begin, k_end = k_begin.astype(f32), k_end.astype(f32)
        width, half = columns[0, rows, 0], columns[1, rows, 0]
        centres[0, rows, bins] = (k_begin + f32(0.5)) * width
        centres[1, rows, bins] = k_end * width + half
        covered[rows, bins] = (k_end - k_begin) - f32(1)


def range_errors(density: np.ndarray, bin_width: float, dst_nbins: int) -> RangeErrors:
    """The fastest exact error kernel for this histogram (float32 ``density``, count / width)."""
    bins = density.shape[0]
    if GridErrors.applies(bins, bin_width, dst_nbins):
        return GridErrors(density, bin_width, dst_nbins)
    return FloorDivErrors(density, bin_width, dst_nbins, bins * bin_width < _FINITE_TERMS_RANGE)


def quantization_errors(
    density: np.ndarray,
    bin_width: float,
    dst_nbins: int,
    starts: list[int],
    ends: list[int],
    kernel: str = "auto",
) -> list[float]:
    """torch.ao's quantization errors of the ranges ``zip(starts, ends)``, bit for bit.

    ``kernel``: ``"auto"`` (:func:`range_errors`' choice), ``"grid"`` (:class:`GridErrors`; only
    where it :meth:`~GridErrors.applies`) or ``"floor_div"`` (:class:`FloorDivErrors`).
    """
    with np.errstate(all="ignore"):
        if kernel == "auto":
            errors = range_errors(density, bin_width, dst_nbins)
        elif kernel == "grid":
            if not GridErrors.applies(density.shape[0], bin_width, dst_nbins):
                raise ValueError(
                    f"the grid kernel does not apply to {density.shape[0]} bins of width {bin_width} "
                    f"and {dst_nbins} destination bins; use kernel='auto' or 'floor_div'"
                )
            errors = GridErrors(density, bin_width, dst_nbins)
        elif kernel == "floor_div":
            errors = FloorDivErrors(density, bin_width, dst_nbins, False)
        else:
            raise ValueError(f"kernel must be 'auto', 'grid' or 'floor_div', got {kernel!r}")
        return errors.errors(starts, ends)


# ----------------------------------------------------------------------------- the search
def search_bin_range(histogram: torch.Tensor, bin_width: float, dst_nbins: int) -> tuple[int, int]:
    """The (start_bin, end_bin) torch.ao's ``_non_linear_param_search`` ends with.

    ``bin_width`` is ``(max_val.item() - min_val.item()) / bins`` (a Python float).
    """
    bins = histogram.numel()
    hist = histogram.detach()
    if hist.device.type != "cpu" or hist.dtype != torch.float32:
        hist = hist.to("cpu", torch.float32)  # the search is torch.ao's float32 arithmetic
    # the cumulative counts as an array of float32 values, which bisect reads as Python floats
    cum = array("f", torch.cumsum(hist, dim=0).numpy().tobytes())
    ranges = candidate_ranges(cum, torch.sum(hist).item())
    start, end = 0, bins - 1
    if bin_width == 0.0:
        # every error is 0.0 (torch.ao's shortcut), so no range is ever rejected
        for start, end in ranges:
            pass
        return start, end
    with np.errstate(all="ignore"):
        counts = hist.numpy()
        density = counts / np.float32(bin_width)
        return _search_with_exact_errors(ranges, range_errors(density, bin_width, dst_nbins), bins)


def _next_batch(ranges: Iterator[tuple[int, int]], size: int) -> tuple[list[int], list[int]]:
    starts, ends = [], []
    for next_start, next_end in ranges:
        starts.append(next_start)
        ends.append(next_end)
        if len(starts) == size:
            break
    return starts, ends


def _search_with_exact_errors(ranges: Iterator[tuple[int, int]], kernel: RangeErrors, bins: int) -> tuple[int, int]:
    """torch.ao's loop over the candidates, with every error computed exactly."""
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
