"""Keep the fewest partitions float that reach an accuracy target (``qcore.quantize(min_sqnr_db=...)``).

Greedy by sensitivity, re-measured as it goes: quantize everything and measure; while the
target is not met, measure every remaining partition kept float on top of those already
float (:func:`qcore.accuracy.sensitivity.rank_partitions`), keep the one that helps most
float, and measure again. The measure is what runs: the lowered model's output SQNR vs float
over the calibration batches (``min_sqnr_db``), or the user's ``accuracy_fn(model) -> float``
on it, which must stay within ``max_drop`` of the float model's (``accuracy_fn`` uses the SQNR
ranking to choose, its own value to stop). At most ``max_float`` partitions go float (default:
all but one). An unreachable target raises :class:`AccuracyTargetError` naming the best value
reached, or, with ``strict=False``, warns (:class:`AccuracyTargetWarning`) and keeps the best.

>>> import torch, qcore
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
>>> batches = [(torch.randn(4, 8),) for _ in range(4)]
>>> result = qcore.quantize(model, batches[0], backend="reference", calibration=batches, min_sqnr_db=90.0,
...                         measure_latency=False)
Traceback (most recent call last):
...
qcore.accuracy.accuracy_target.AccuracyTargetError: min_sqnr_db=90.0 not reached: the best output SQNR was ...
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional

import attrs

from qcore.accuracy.flow import Built, Flow
from qcore.accuracy.partitions import keep_map
from qcore.accuracy.sensitivity import SensitivityRecord, rank_partitions
from qcore.errors import QuantizeError

__all__ = ["AccuracyTargetError", "AccuracyTargetWarning", "TargetResult", "search_float_partitions", "check_target_options"]


class AccuracyTargetError(QuantizeError):
    """The accuracy target was not reached with the partitions allowed to stay float."""


class AccuracyTargetWarning(UserWarning):
    """``strict=False``: the accuracy target was not reached; the best model found is kept."""


@attrs.define
class TargetResult:
    """What the search found: the ``built`` model, the ``kept_float`` decisions (report
    ``FloatDecision`` records), the one-line ``summary``, the first ``sensitivity`` ranking and
    whether the target was ``reached``."""

    built: Built
    kept_float: list
    summary: str
    sensitivity: list
    reached: bool


def check_target_options(min_sqnr_db: Any, accuracy_fn: Any, max_drop: Any, max_float: Any, strict: Any) -> None:
    """One-line errors for bad accuracy-target arguments."""
    if min_sqnr_db is not None and (isinstance(min_sqnr_db, bool) or not isinstance(min_sqnr_db, (int, float)) or not math.isfinite(min_sqnr_db)):
        raise QuantizeError(f"min_sqnr_db must be a finite number of dB (e.g. 35.0), got {min_sqnr_db!r}")
    if accuracy_fn is not None and not callable(accuracy_fn):
        raise QuantizeError(f"accuracy_fn must be a callable(model) -> float, got {accuracy_fn!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not max_drop >= 0:
        raise QuantizeError(f"max_drop must be a number >= 0 (the allowed drop of accuracy_fn, e.g. 0.01), got {max_drop!r}")
    if max_float is not None and (isinstance(max_float, bool) or not isinstance(max_float, int) or max_float < 0):
        raise QuantizeError(f"max_float must be None or an integer >= 0 (how many partitions may stay float), got {max_float!r}")
    if not isinstance(strict, bool):
        raise QuantizeError(f"strict must be True or False, got {strict!r}")


def _metric(accuracy_fn: Callable[[Any], Any], model: Any) -> float:
    value = accuracy_fn(model)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise QuantizeError(f"accuracy_fn must return a finite number, got {value!r}")
    return float(value)


def search_float_partitions(
    flow: Flow,
    min_sqnr_db: Optional[float] = None,
    accuracy_fn: Optional[Callable[[Any], float]] = None,
    max_drop: float = 0.01,
    max_float: Optional[int] = None,
    strict: bool = True,
    progress: Optional[Callable[[Iterable, str], Iterable]] = None,
) -> TargetResult:
    """Run the greedy search of the module docstring on ``flow``."""
    from qcore.app.report import FloatDecision

    if min_sqnr_db is None and accuracy_fn is None:
        raise QuantizeError("search_float_partitions needs min_sqnr_db or accuracy_fn")
    partitions = flow.partitions()
    limit = max(len(partitions) - 1, 0) if max_float is None else min(max_float, len(partitions))
    wanted_metric: Optional[float] = None
    float_metric = 0.0
    if accuracy_fn is not None:
        float_metric = _metric(accuracy_fn, flow.reference if flow.reference is not None else flow.exported)
        wanted_metric = float_metric - max_drop

    def measure(built: Built) -> tuple[float, Optional[float]]:
        sqnr = flow.sqnr_db(built.keep, built)
        metric = _metric(accuracy_fn, built.model) if accuracy_fn is not None else None
        return sqnr, metric

    def reached(sqnr: float, metric: Optional[float]) -> bool:
        ok = True
        if min_sqnr_db is not None:
            ok = ok and sqnr >= min_sqnr_db
        if wanted_metric is not None:
            ok = ok and metric is not None and metric >= wanted_metric
        return ok

    keep: dict = {}
    built = flow.build(keep)
    sqnr, metric = measure(built)
    best = (built, sqnr, metric)
    decisions: list = []
    first_ranking: list[SensitivityRecord] = []
    remaining = list(partitions)
    while not reached(sqnr, metric) and len(decisions) < limit and remaining:
        ranking = rank_partitions(flow, remaining, keep=keep, baseline_db=sqnr, progress=progress)
        if not first_ranking:
            first_ranking = ranking
        choice = ranking[0]
        partition = next(p for p in remaining if p.name == choice.partition)
        step = len(decisions) + 1
        why = (
            f"the most sensitive remaining partition (output SQNR {sqnr:.1f} dB -> {choice.sqnr_db:.1f} dB "
            f"kept float; target {_target_text(min_sqnr_db, wanted_metric)})"
        )
        keep.update(keep_map([partition], f"kept float by the accuracy target, step {step}: {why}"))
        remaining.remove(partition)
        built = flow.build(keep)
        before = metric if accuracy_fn is not None else sqnr
        sqnr, metric = measure(built)
        after = metric if accuracy_fn is not None else sqnr
        decisions.append(FloatDecision(partition.name, partition.nodes, step, float(before or 0.0), float(after or 0.0), why))
        if _better((sqnr, metric), best[1:], accuracy_fn is not None):
            best = (built, sqnr, metric)
    ok = reached(sqnr, metric)
    if not ok:
        built, sqnr, metric = best
        n_float = len([d for d in decisions if all(name in built.keep for name in d.nodes)])
        kept_names = [d.partition for d in decisions if all(name in built.keep for name in d.nodes)]
        what = f"the best output SQNR was {sqnr:.1f} dB" if accuracy_fn is None else (
            f"the best accuracy_fn value was {metric:.4g} (float {float_metric:.4g}, allowed drop {max_drop:g}; "
            f"output SQNR {sqnr:.1f} dB)"
        )
        message = (
            f"{_target_name(min_sqnr_db, accuracy_fn, max_drop)} not reached: {what} with {n_float} of {len(partitions)} "
            f"partitions float ({', '.join(kept_names) or 'none'}); lower the target, allow more float partitions "
            f"(max_float={limit}), or pass strict=False to keep the best"
        )
        if strict:
            raise AccuracyTargetError(message)
        warnings.warn(message, AccuracyTargetWarning, stacklevel=3)
        decisions = [d for d in decisions if all(name in built.keep for name in d.nodes)]
    status = "reached" if ok else "NOT reached (strict=False: kept the best)"
    measured = f"output SQNR {sqnr:.1f} dB over {len(flow.calibration)} calibration batches"
    if metric is not None:
        measured += f", accuracy_fn {metric:.4g}"
    summary = (
        f"{_target_name(min_sqnr_db, accuracy_fn, max_drop)} {status}: {measured} with {len(decisions)} of "
        f"{len(partitions)} partitions float"
    )
    return TargetResult(built, decisions, summary, first_ranking, ok)


def _better(candidate: tuple, best: tuple, by_metric: bool) -> bool:
    if by_metric and candidate[1] is not None and best[1] is not None and candidate[1] != best[1]:
        return candidate[1] > best[1]
    return candidate[0] > best[0]


def _target_name(min_sqnr_db: Optional[float], accuracy_fn: Any, max_drop: float) -> str:
    parts = []
    if min_sqnr_db is not None:
        parts.append(f"min_sqnr_db={_number(min_sqnr_db)}")
    if accuracy_fn is not None:
        parts.append(f"accuracy_fn within max_drop={max_drop:g}")
    return " and ".join(parts)


def _target_text(min_sqnr_db: Optional[float], wanted_metric: Optional[float]) -> str:
    parts = []
    if min_sqnr_db is not None:
        parts.append(f"{_number(min_sqnr_db)} dB")
    if wanted_metric is not None:
        parts.append(f"accuracy_fn >= {wanted_metric:.4g}")
    return " and ".join(parts)


def _number(value: float) -> str:
    text = f"{value:.6g}"
    return text if any(c in text for c in ".en") else text + ".0"
