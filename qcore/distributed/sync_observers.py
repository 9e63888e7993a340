"""``sync_observers``: combine every observer's statistics across a process group.

After (or during) calibration on shards of the data, each rank's observers have seen only its
own batches. ``sync_observers(prepared)`` combines them so that every rank holds the same state,
and ``convert_pt2e`` then gives the same program on every rank. The rules, per observer class:

* ``MinMaxObserver``, ``PerChannelMinMaxObserver``: the minimum of the ranks' ``min_val`` and
  the maximum of their ``max_val`` (``all_reduce`` MIN/MAX), exact: the qparams are those of one
  process that observed every rank's batches, bit for bit. A rank that saw nothing contributes
  nothing (per channel: its empty buffers take the others' channel count).
* ``MovingAverageMinMaxObserver``, ``MovingAveragePerChannelMinMaxObserver``: the same MIN/MAX.
  The moving-average update ``m + c * (x - m)`` is monotone in ``x`` (also in float32
  arithmetic), so when the ranks start a step from the same state and are synced after it, the
  synced state is exactly one process's moving average over a step whose batch is the union of
  the ranks' batches (its min is the least of theirs). Synced only once after many steps, the
  result is the envelope of the ranks' averages: for each bound, the widest rank's.
* ``HistogramObserver``: the range becomes the union of the ranks' ranges (exact MIN/MAX); each
  rank's histogram is moved onto that common range by the re-binning one observer applies when
  its range grows (``upsample_rate`` sub-bins, each to the bin holding its mid point), and the
  moved histograms are added in rank order. This is :func:`merge_histograms` of the ranks'
  observers: the range is exact, the total count too (up to the float32 rounding of the
  fractional counts re-binning makes, as in one observer); the per-bin counts differ from one process that saw the
  same batches in one stream only by where re-binning happened (as the single-process result
  already depends on batch order).
* ``FakeQuantize`` and ``FusedMovingAvgObsFakeQuantize``: their observer by the rules above;
  then, while the observer is enabled, ``scale``/``zero_point`` are recomputed from the synced
  statistics; while it is disabled (ranges frozen) rank 0's are broadcast.
* ``FixedQParams*``, ``DerivedObserverOrFakeQuantize``: nothing to combine (a derived observer
  reads its synced sources); ``PlaceholderObserver``: "observed" on any rank.
* torch.ao's ``MinMaxObserver``/``PerChannelMinMaxObserver`` (and their moving-average
  subclasses), ``FakeQuantize`` and ``FusedMovingAvgObsFakeQuantize``: as qcore's.

Any other class (a plugin's observer, a subclass that may keep more state, torch.ao's
histogram) is refused by name before any collective runs, unless it has a method
``sync_across_ranks(self, collective)`` or a rule registered with :func:`register_sync`
(``collective`` is a :class:`qcore.distributed.Collective`: ``min_``, ``max_``, ``sum_``,
``gather``, ``broadcast_``).

Without an initialised process group (or with one rank) ``sync_observers`` changes nothing and
returns the number of observers it would combine:

>>> import torch, qcore
>>> from qcore.reference import ReferenceQuantizer
>>> gm = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()
>>> prepared = qcore.prepare_pt2e(gm, ReferenceQuantizer().set_global(ReferenceQuantizer.default_config()))
>>> _ = prepared(torch.randn(2, 4))
>>> sync_observers(prepared)
3
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
from torch.ao.quantization import fake_quantize as _ao_fake_quantize
from torch.ao.quantization import observer as _ao_observer

from qcore.distributed.collectives import Collective, DistributedError
from qcore.errors import QcoreError
from qcore.observers import (
    DerivedObserverOrFakeQuantize,
    FakeQuantize,
    FixedQParamsFakeQuantize,
    FixedQParamsObserver,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    is_observer_or_fake_quant,
)

__all__ = ["UnsupportedObserverError", "merge_histograms", "observer_modules", "register_sync", "sync_observers"]

SyncFn = Callable[[torch.nn.Module, Collective], None]


class UnsupportedObserverError(QcoreError, TypeError):
    """An observer class with no rule to combine its statistics across ranks."""


# --------------------------------------------------------------------------- the rules
def _sync_per_tensor_min_max(observer: Any, collective: Collective) -> None:
    both = torch.stack([observer.min_val.reshape(()), -observer.max_val.reshape(())])
    collective.min_(both)
    observer.min_val.copy_(both[0].reshape(observer.min_val.shape))
    observer.max_val.copy_((-both[1]).reshape(observer.max_val.shape))


def _sync_per_channel_min_max(observer: Any, collective: Collective) -> None:
    min_val, max_val = observer.min_val, observer.max_val
    sizes = {int(n) for n in collective.gather(torch.tensor([min_val.numel()], dtype=torch.int64))} - {0}
    if not sizes:
        return  # no rank observed anything
    if len(sizes) > 1:
        raise DistributedError(
            f"{_who(observer)}: the ranks observed different channel counts {sorted(sizes)}; "
            "every rank must run the same model on inputs of the same channel count"
        )
    (channels,) = sizes
    if min_val.numel() == 0:
        local_min = torch.full((channels,), math.inf, dtype=min_val.dtype, device=min_val.device)
        local_max = torch.full((channels,), -math.inf, dtype=max_val.dtype, device=max_val.device)
    else:
        local_min, local_max = min_val.reshape(-1), max_val.reshape(-1)
    both = torch.cat([local_min, -local_max])
    collective.min_(both)
    for buffer, value in ((min_val, both[:channels]), (max_val, -both[channels:])):
        buffer.resize_(value.shape)
        buffer.copy_(value)


def _who(module: Any) -> str:
    name = getattr(module, "node_name", None)
    return f"{type(module).__name__} for node {name!r}" if name else type(module).__name__


def _moved_histogram(observer: HistogramObserver, histogram: torch.Tensor, low: float, high: float,
                     new_low: float, new_high: float) -> torch.Tensor:
    """``histogram`` (over [low, high]) moved onto [new_low, new_high] as the observer moves it
    when its range grows; zeros for an observer that saw nothing."""
    if low == math.inf:
        return torch.zeros_like(histogram)
    if low == new_low and high == new_high:
        return histogram.clone()
    as_tensor = lambda value: torch.tensor(value, dtype=torch.float32, device=histogram.device)  # noqa: E731
    moved = observer._combine_histograms(
        histogram, as_tensor(low), as_tensor(high), torch.zeros_like(histogram), as_tensor(new_low), as_tensor(new_high)
    )
    return moved.to(histogram.dtype)


def _merge_histogram_states(observer: HistogramObserver, states: list[tuple[torch.Tensor, float, float]]
                            ) -> tuple[torch.Tensor, float, float]:
    new_low = min(low for _, low, _ in states)
    new_high = max(high for _, _, high in states)
    total = torch.zeros_like(states[0][0])
    if new_low == math.inf:
        return total, new_low, new_high
    for histogram, low, high in states:
        total = total + _moved_histogram(observer, histogram, low, high, new_low, new_high)
    return total, new_low, new_high


def merge_histograms(observers: Iterable[HistogramObserver]) -> HistogramObserver:
    """A new :class:`HistogramObserver` holding the statistics of ``observers`` combined, in order,
    by the rule ``sync_observers`` applies across ranks (the union range; each histogram moved
    onto it by the observer's own re-binning; added in order). The inputs are not changed.

    >>> import torch
    >>> a, b = HistogramObserver(bins=8), HistogramObserver(bins=8)
    >>> _ = a(torch.tensor([0.0, 1.0])); _ = b(torch.tensor([0.0, 2.0]))
    >>> merged = merge_histograms([a, b])
    >>> float(merged.min_val), float(merged.max_val), float(merged.histogram.sum())
    (0.0, 2.0, 4.0)
    """
    observers = list(observers)
    if not observers:
        raise ValueError("merge_histograms needs at least one HistogramObserver")
    for observer in observers:
        if type(observer) is not HistogramObserver:
            raise TypeError(f"merge_histograms merges qcore HistogramObservers, got {type(observer).__name__}")
        if observer.bins != observers[0].bins:
            raise ValueError(f"merge_histograms: the observers have different bins ({observers[0].bins} and {observer.bins})")
    states = [(o.histogram, o.min_val.item(), o.max_val.item()) for o in observers]
    histogram, low, high = _merge_histogram_states(observers[0], states)
    merged = copy.deepcopy(observers[0])
    merged.histogram.copy_(histogram)
    merged.min_val.fill_(low)
    merged.max_val.fill_(high)
    return merged


def _sync_histogram(observer: HistogramObserver, collective: Collective) -> None:
    ranges = collective.gather(torch.stack([observer.min_val.reshape(()), observer.max_val.reshape(())]).to(torch.float32))
    histograms = collective.gather(observer.histogram)
    states = [(h, float(r[0]), float(r[1])) for h, r in zip(histograms, ranges)]
    histogram, low, high = _merge_histogram_states(observer, states)
    observer.histogram.copy_(histogram)
    observer.min_val.fill_(low)
    observer.max_val.fill_(high)


def _sync_placeholder(observer: PlaceholderObserver, collective: Collective) -> None:
    flag = torch.tensor([1 if observer._observed else 0], dtype=torch.int64)
    collective.max_(flag)
    observer._observed = bool(flag.item())


def _nothing(module: torch.nn.Module, collective: Collective) -> None:
    return None


def _has_observed(fake_quant: Any) -> bool:
    if hasattr(fake_quant, "has_observed"):
        return bool(fake_quant.has_observed())
    min_val = getattr(fake_quant.activation_post_process, "min_val", None)  # torch.ao's
    return isinstance(min_val, torch.Tensor) and min_val.numel() > 0 and bool(torch.isfinite(min_val).all())


def _sync_fake_quantize(fake_quant: Any, collective: Collective) -> None:
    post = fake_quant.activation_post_process
    _rule_for(post, "activation_post_process")(post, collective)
    if int(fake_quant.observer_enabled[0]) == 1:
        if not _has_observed(fake_quant):
            return  # no rank saw data: keep the initial scale and zero point
        scale, zero_point = fake_quant.calculate_qparams()
        for buffer, value in ((fake_quant.scale, scale), (fake_quant.zero_point, zero_point)):
            value = value.to(device=buffer.device, dtype=buffer.dtype)
            if buffer.shape != value.shape:
                buffer.resize_(value.shape)
            buffer.copy_(value)
        return
    for buffer in (fake_quant.scale, fake_quant.zero_point):  # frozen ranges: rank 0's
        size = torch.tensor([buffer.numel()], dtype=torch.int64)
        collective.broadcast_(size)
        if buffer.numel() != int(size):
            buffer.resize_((int(size),))
        collective.broadcast_(buffer)


_RULES: dict[type, SyncFn] = {
    MinMaxObserver: _sync_per_tensor_min_max,
    MovingAverageMinMaxObserver: _sync_per_tensor_min_max,
    PerChannelMinMaxObserver: _sync_per_channel_min_max,
    MovingAveragePerChannelMinMaxObserver: _sync_per_channel_min_max,
    HistogramObserver: _sync_histogram,  # type: ignore[dict-item]
    FakeQuantize: _sync_fake_quantize,
    FusedMovingAvgObsFakeQuantize: _sync_fake_quantize,
    FixedQParamsObserver: _nothing,
    FixedQParamsFakeQuantize: _nothing,
    DerivedObserverOrFakeQuantize: _nothing,
    PlaceholderObserver: _sync_placeholder,  # type: ignore[dict-item]
    _ao_observer.MinMaxObserver: _sync_per_tensor_min_max,
    _ao_observer.MovingAverageMinMaxObserver: _sync_per_tensor_min_max,
    _ao_observer.PerChannelMinMaxObserver: _sync_per_channel_min_max,
    _ao_observer.MovingAveragePerChannelMinMaxObserver: _sync_per_channel_min_max,
    _ao_observer.FixedQParamsObserver: _nothing,
    _ao_fake_quantize.FakeQuantize: _sync_fake_quantize,
    _ao_fake_quantize.FusedMovingAvgObsFakeQuantize: _sync_fake_quantize,
    _ao_fake_quantize.FixedQParamsFakeQuantize: _nothing,
}


def register_sync(cls: type, fn: SyncFn) -> None:
    """Register ``fn(module, collective)`` as the rule that combines the statistics of ``cls``'s
    instances (exactly that class, not its subclasses) across ranks; it must leave the same state
    on every rank. For a class you cannot give a ``sync_across_ranks`` method.

    >>> class MyObserver(MinMaxObserver):
    ...     pass
    >>> register_sync(MyObserver, lambda module, collective: None)
    """
    if not isinstance(cls, type) or not callable(fn):
        raise TypeError(f"register_sync(cls, fn) takes a class and a callable fn(module, collective), got {cls!r}, {fn!r}")
    _RULES[cls] = fn


def _rule_for(module: torch.nn.Module, name: str) -> SyncFn:
    method = getattr(module, "sync_across_ranks", None)
    if callable(method):
        return lambda _module, collective: method(collective)
    rule = _RULES.get(type(module))
    if rule is not None:
        return rule
    cls = type(module)
    raise UnsupportedObserverError(
        f"sync_observers: observer {cls.__module__}.{cls.__qualname__} at {name!r} has no rule to combine its "
        "statistics across ranks; give the class a sync_across_ranks(self, collective) method or register one "
        "with qcore.distributed.register_sync(cls, fn)"
    )


def observer_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every observer or fake-quantizer of ``model`` (a DDP wrapper is
    looked through), outermost only: a fake-quantizer's own observer is not listed apart.

    >>> observer_modules(torch.nn.Linear(2, 2))
    []
    """
    root = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in root.named_modules():
        if not is_observer_or_fake_quant(module):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return found


def sync_observers(prepared: torch.nn.Module, group: Any = None) -> int:
    """Combine the statistics of every observer and fake-quantizer of ``prepared`` across the ranks
    of ``group`` (None: the default process group), in place, so every rank holds the same state;
    returns how many were combined. Every rank must call it, with the same model. The rules per
    class are in this module's docstring. Without an initialised process group, or with one rank,
    nothing changes (the count is still returned, and unsupported observers still refused).

    >>> import torch, qcore
    >>> from qcore.reference import ReferenceQuantizer
    >>> gm = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()
    >>> prepared = qcore.prepare_pt2e(gm, ReferenceQuantizer().set_global(ReferenceQuantizer.default_config()))
    >>> _ = prepared(torch.randn(2, 4))
    >>> sync_observers(prepared)
    3

    Raises :class:`UnsupportedObserverError` naming an observer class with no rule (on every
    rank, before any collective), and :class:`qcore.distributed.DistributedError` when the ranks'
    models differ or a collective fails (a rank died or timed out).
    """
    modules = observer_modules(prepared)
    rules = [(name, module, _rule_for(module, name)) for name, module in modules]
    for name, module, rule in rules:  # a fake-quantizer's observer too: refused before any collective
        if rule is _sync_fake_quantize:
            _rule_for(getattr(module, "activation_post_process"), f"{name}.activation_post_process")
    collective = Collective.of(group)
    if not collective.active:
        return len(rules)
    collective.agree(
        "the observers of the model", [(name, type(module).__qualname__) for name, module in modules],
        describe=lambda value: f"{len(value)} observers ({', '.join(n for n, _ in value[:3])}{', ...' if len(value) > 3 else ''})",
    )
    for name, module, rule in rules:
        rule(module, collective)
    return len(rules)

