"""qcore observers against the torch.ao oracle: same statistics, same scales and zero points.

Min-max family: bit-exact (``torch.equal``) on scale and zero point. Histogram: identical
histogram, scale within 1e-6 relative, identical zero point, over several batches so the
re-binning runs. Plus the API around them: ``with_args``, argument checks, NaN/inf, state.
"""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import warnings
from array import array

import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as ao
from torch.ao.quantization import _DerivedObserverOrFakeQuantize
from torch.ao.quantization.fake_quantize import FakeQuantize as AoFakeQuantize

from qcore.errors import CalibrationError
from qcore.observers import (
    DerivedObserverOrFakeQuantize,
    FakeQuantize,
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverConstructor,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    calculate_qparams_from_min_max,
    is_observer_or_fake_quant,
)
from qcore.observers import histogram_search


@pytest.fixture(params=["compiled", "numpy"])
def search_path(request, monkeypatch):
    """Run a test with the compiled histogram search, then with the numpy one alone."""
    if request.param == "compiled" and histogram_search._search_kernel is None:
        pytest.skip("qcore was built without its compiled histogram search (no C compiler)")
    if request.param == "numpy":
        monkeypatch.setattr(histogram_search, "_search_kernel", None)
    return request.param

SYM, AFF = torch.per_tensor_symmetric, torch.per_tensor_affine
PC_SYM, PC_AFF, PC_FLOAT = (
    torch.per_channel_symmetric,
    torch.per_channel_affine,
    torch.per_channel_affine_float_qparams,
)


@pytest.fixture(autouse=True)
def _quiet_reduce_range_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduce_range.*")
        yield


# ----------------------------------------------------------------------------- data
def _batches(kind: str, shape=(8, 64), count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """``count`` batches of one distribution; later batches widen the range (re-binning)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        grow = 1.0 + 0.5 * i
        if kind == "normal":
            x = torch.randn(shape, generator=g) * grow + 0.1 * i
        elif kind == "uniform":
            x = torch.rand(shape, generator=g) * 3 * grow - 1
        elif kind == "exponential":
            x = torch.empty(shape).exponential_(generator=g) * grow
        elif kind == "outliers":
            x = torch.randn(shape, generator=g)
            x.view(-1)[:: max(1, x.numel() // 3)] = 25.0 * grow * (-1) ** i
        elif kind == "zeros":
            x = torch.zeros(shape)
        elif kind == "constant":
            x = torch.full(shape, 0.75)
        elif kind == "negative":
            x = -torch.rand(shape, generator=g) * grow - 0.5
        elif kind == "relu":
            x = torch.relu(torch.randn(shape, generator=g) * grow)
        else:
            raise ValueError(kind)
        out.append(x)
    return out


DISTRIBUTIONS = ["normal", "uniform", "exponential", "outliers", "zeros", "constant", "negative", "relu"]

PER_TENSOR_CONFIGS = [
    dict(dtype=torch.uint8),
    dict(dtype=torch.int8, qscheme=SYM),
    dict(dtype=torch.uint8, qscheme=SYM),
    dict(dtype=torch.uint8, qscheme=SYM, quant_min=0, quant_max=127),
    dict(dtype=torch.int8, reduce_range=True),
    dict(dtype=torch.uint8, qscheme=SYM, reduce_range=True),
    dict(dtype=torch.uint8, reduce_range=True, quant_min=0, quant_max=255),
    dict(dtype=torch.int8, quant_min=-127, quant_max=127, eps=2**-12),
    dict(dtype=torch.uint8, quant_min=0, quant_max=15, eps=1e-3),
    dict(dtype=torch.int16, qscheme=SYM),
    dict(dtype=torch.int32, qscheme=SYM, eps=1e-6),
]

PER_CHANNEL_CONFIGS = [
    dict(dtype=torch.int8, qscheme=PC_SYM, ch_axis=0),
    dict(dtype=torch.uint8, qscheme=PC_AFF, ch_axis=1),
    dict(dtype=torch.uint8, qscheme=PC_FLOAT, ch_axis=0),
    dict(dtype=torch.uint8, qscheme=PC_SYM, ch_axis=0),
    dict(dtype=torch.int8, qscheme=PC_AFF, ch_axis=-1, reduce_range=True),
    dict(dtype=torch.int8, qscheme=PC_SYM, ch_axis=0, quant_min=-127, quant_max=127, eps=2**-12),
]


def _ids(configs):
    return ["-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in c.items()) for c in configs]


def _assert_same_qparams(ours, theirs):
    scale, zero_point = ours
    ao_scale, ao_zero_point = theirs
    assert scale.dtype == ao_scale.dtype and zero_point.dtype == ao_zero_point.dtype
    assert torch.equal(scale, ao_scale), (scale, ao_scale)
    assert torch.equal(zero_point, ao_zero_point), (zero_point, ao_zero_point)


def _per_channel_batches(kind: str) -> list[torch.Tensor]:
    """[4, 6, 5] batches, each channel scaled differently; channel 2 all zeros, 3 constant."""
    batches = []
    for x in _batches(kind, shape=(4, 6, 5)):
        x = x * torch.tensor([1.0, 0.01, 1.0, 1.0, 7.0, 0.5]).view(1, 6, 1)
        x[:, 2] = 0.0
        x[:, 3] = -0.25
        batches.append(x)
    return batches


# ----------------------------------------------------------------------------- min-max family
@pytest.mark.parametrize("config", PER_TENSOR_CONFIGS, ids=_ids(PER_TENSOR_CONFIGS))
@pytest.mark.parametrize("kind", DISTRIBUTIONS)
@pytest.mark.parametrize(
    "ours, theirs, extra",
    [
        (MinMaxObserver, ao.MinMaxObserver, {}),
        (MovingAverageMinMaxObserver, ao.MovingAverageMinMaxObserver, {"averaging_constant": 0.3}),
    ],
    ids=["minmax", "moving_average"],
)
def test_per_tensor_minmax_matches_torch_ao(ours, theirs, extra, kind, config):
    obs, ref = ours(**config, **extra), theirs(**config, **extra)
    for x in _batches(kind):
        assert obs(x) is x
        ref(x)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    assert (obs.quant_min, obs.quant_max) == (ref.quant_min, ref.quant_max)
    _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("config", PER_CHANNEL_CONFIGS, ids=_ids(PER_CHANNEL_CONFIGS))
@pytest.mark.parametrize("kind", ["normal", "exponential", "outliers", "zeros", "constant", "negative"])
@pytest.mark.parametrize(
    "ours, theirs, extra",
    [
        (PerChannelMinMaxObserver, ao.PerChannelMinMaxObserver, {}),
        (
            MovingAveragePerChannelMinMaxObserver,
            ao.MovingAveragePerChannelMinMaxObserver,
            {"averaging_constant": 0.25},
        ),
    ],
    ids=["per_channel", "moving_average_per_channel"],
)
def test_per_channel_minmax_matches_torch_ao(ours, theirs, extra, kind, config):
    obs, ref = ours(**config, **extra), theirs(**config, **extra)
    for x in _per_channel_batches(kind):
        obs(x)
        ref(x)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize(
    "min_val, max_val",
    [(-1.0, 1.0), (0.0, 0.0), (0.5, 0.5), (-3.0, -1.0), (2.0, 9.0), (-1e-12, 1e-12), (-1e30, 1e30)],
)
@pytest.mark.parametrize("config", PER_TENSOR_CONFIGS[:9], ids=_ids(PER_TENSOR_CONFIGS[:9]))
def test_shared_qparams_function_matches_torch_ao(min_val, max_val, config):
    ref = ao.MinMaxObserver(**config)
    ours = MinMaxObserver(**config)
    lo, hi = torch.tensor(min_val), torch.tensor(max_val)
    got = calculate_qparams_from_min_max(
        lo,
        hi,
        dtype=ours.dtype,
        qscheme=ours.qscheme,
        quant_min=ours.quant_min,
        quant_max=ours.quant_max,
        eps=ours.eps,
        has_customized_qrange=ours.has_customized_qrange,
    )
    _assert_same_qparams(got, ref._calculate_qparams(lo, hi))


def test_moving_average_first_batch_sets_the_range_and_later_ones_average():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs(torch.tensor([0.0, 4.0]))
    obs(torch.tensor([-2.0, 2.0]))
    assert float(obs.min_val) == -1.0 and float(obs.max_val) == 3.0


def test_dynamic_moving_average_needs_averaging_constant_one():
    MovingAverageMinMaxObserver(averaging_constant=1, is_dynamic=True)
    with pytest.raises(ValueError, match="averaging_constant=1"):
        MovingAverageMinMaxObserver(is_dynamic=True)


# ----------------------------------------------------------------------------- histogram
HISTOGRAM_CONFIGS = [
    dict(dtype=torch.uint8),
    dict(dtype=torch.int8, qscheme=SYM),
    dict(dtype=torch.int8, quant_min=-127, quant_max=127, eps=2**-12),
    dict(dtype=torch.uint8, reduce_range=True),
    dict(dtype=torch.uint8, qscheme=SYM, quant_min=0, quant_max=127, eps=1e-3),
]


def _assert_histogram_qparams_close(ours, theirs):
    (scale, zero_point), (ao_scale, ao_zero_point) = ours, theirs
    torch.testing.assert_close(scale, ao_scale, rtol=1e-6, atol=0.0)
    assert torch.equal(zero_point, ao_zero_point) and zero_point.dtype == ao_zero_point.dtype


# every distribution with two or three configs, every config with four distributions
HISTOGRAM_CASES = [
    (kind, config)
    for i, kind in enumerate(DISTRIBUTIONS)
    for j, config in enumerate(HISTOGRAM_CONFIGS)
    if (i + j) % 2 == 0
]


@pytest.mark.parametrize(
    "kind, config", HISTOGRAM_CASES, ids=[f"{k}-{i}" for (k, _), i in zip(HISTOGRAM_CASES, _ids([c for _, c in HISTOGRAM_CASES]))]
)
def test_histogram_matches_torch_ao(kind, config):
    obs, ref = HistogramObserver(**config), ao.HistogramObserver(**config)
    for x in _batches(kind, shape=(16, 128), count=4, seed=3):
        assert obs(x) is x
        ref(x)
    assert torch.equal(obs.histogram, ref.histogram)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)
    _assert_histogram_qparams_close(obs.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("bins", [2048, 256, 100])
@pytest.mark.parametrize("seed", range(4))
def test_histogram_search_matches_torch_ao_on_random_histograms(bins, seed, search_path):
    """Odd histograms set directly: gaps, spikes, heavy edges, exact bin alignments."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (bins,), generator=g).float()
    counts[torch.rand(bins, generator=g) < 0.4] = 0.0  # empty bins
    counts[torch.randint(0, bins, (3,), generator=g)] = 5000.0  # spikes
    counts[: bins // 16] *= seed  # a heavy or empty left edge
    obs, ref = HistogramObserver(bins=bins), ao.HistogramObserver(bins=bins)
    for module in (obs, ref):
        module.histogram.copy_(counts)
        module.min_val.fill_(-1.25 * (seed + 1))
        module.max_val.fill_(3.5)
    new_min, new_max = obs._non_linear_param_search()
    ao_min, ao_max = ref._non_linear_param_search()
    assert torch.equal(new_min, ao_min) and torch.equal(new_max, ao_max)


def test_batched_errors_are_bit_identical_to_torch_ao():
    ref = ao.HistogramObserver()
    for x in _batches("exponential", shape=(32, 64), count=3):
        ref(x)
    bin_width = (ref.max_val.item() - ref.min_val.item()) / ref.bins
    g = torch.Generator().manual_seed(0)
    ranges = [tuple(sorted(torch.randint(0, 2048, (2,), generator=g).tolist())) for _ in range(60)]
    ranges += [(s, s + 255) for s in range(0, 1700, 97)] + [(0, 2047), (7, 7), (2047, 2047)]
    density = ref.histogram.numpy() / np.float32(bin_width)
    errors = histogram_search.quantization_errors(
        density, bin_width, ref.dst_nbins, [r[0] for r in ranges], [r[1] for r in ranges]
    )
    expected = [ref._compute_quantization_error(s, e) for s, e in ranges]
    assert errors == expected
    for count in (1, 2, 3):  # small batches reduce the same way
        assert histogram_search.quantization_errors(
            density, bin_width, ref.dst_nbins, [r[0] for r in ranges[:count]], [r[1] for r in ranges[:count]]
        ) == expected[:count]


def _candidate_ranges_of(ref) -> list[tuple[int, int]]:
    cum = array("f", torch.cumsum(ref.histogram, dim=0).numpy().tobytes())
    return list(histogram_search.candidate_ranges(cum, torch.sum(ref.histogram).item()))


@pytest.mark.parametrize("kind", ["normal", "exponential", "outliers", "relu", "uniform"])
@pytest.mark.parametrize("dst_dtype", [torch.uint8, torch.int8])
def test_estimated_errors_are_within_their_bound_of_torch_ao(kind, dst_dtype):
    """The float64 estimate of every candidate range the search walks is within its bound of
    torch.ao's own float32 ``_compute_quantization_error`` (the bound the search relies on)."""
    ao_dtype = {torch.uint8: torch.quint8, torch.int8: torch.qint8}[dst_dtype]
    ref = ao.HistogramObserver(dtype=ao_dtype, reduce_range=dst_dtype == torch.int8)
    for x in _batches(kind, shape=(64, 128), count=3, seed=11):
        ref(x)
    bin_width = (ref.max_val.item() - ref.min_val.item()) / ref.bins
    ranges = _candidate_ranges_of(ref)[:40]
    starts, ends = [r[0] for r in ranges], [r[1] for r in ranges]
    estimate = histogram_search.EstimatedErrors(ref.histogram.numpy(), bin_width, ref.dst_nbins)
    estimates, bounds = estimate.errors(starts, ends, with_bounds=True)
    plain, no_bounds = estimate.errors(starts, ends)
    assert no_bounds is None and np.array_equal(plain, estimates)
    torch_ao = np.array([ref._compute_quantization_error(s, e) for s, e in ranges])
    # the largest deviation measured is 1.2 bounds; the search allows BOUND_MARGIN (4) bounds
    slack = 2 * bounds + histogram_search.SUM_TOLERANCE * np.abs(estimates)
    assert (np.abs(torch_ao - estimates) <= slack).all()
    # and the bound is a real one, not a blanket: well below the coarse tolerance
    assert (bounds <= histogram_search.COARSE_TOLERANCE / 2 * estimates).all()


def test_estimate_batch_bounds_agree_row_by_row_by_pair_and_all_at_once():
    """The search asks a batch for one row's bound or two neighbouring rows' bounds (cached);
    both equal the bounds of every row computed together."""
    ref = ao.HistogramObserver()
    for x in _batches("normal", shape=(64, 128), count=2, seed=3):
        ref(x)
    bin_width = (ref.max_val.item() - ref.min_val.item()) / ref.bins
    ranges = _candidate_ranges_of(ref)[:6]
    starts, ends = [r[0] for r in ranges], [r[1] for r in ranges]
    estimate = histogram_search.EstimatedErrors(ref.histogram.numpy(), bin_width, ref.dst_nbins)
    every = estimate.batch(starts, ends).bounds()
    assert (every > 0).all()
    batch = estimate.batch(starts, ends)
    assert batch.bound(2) == pytest.approx(every[2], rel=1e-12)
    assert batch.bound_pair(2) == pytest.approx(every[2:4].tolist(), rel=1e-12)  # one of them known
    assert batch.bound_pair(4) == pytest.approx(every[4:6].tolist(), rel=1e-12)  # neither known
    assert batch.bound(5) == batch.bound_pair(4)[1]  # cached
    assert np.array_equal(batch.estimates, estimate.errors(starts, ends)[0])


@pytest.mark.parametrize("path", ["always_exact_near_ties", "no_estimate"])
def test_search_fallbacks_give_torch_ao_result(monkeypatch, path):
    """The two ways the search falls back to torch.ao's exact float32 errors: every close pair
    decided exactly (a huge bound margin), and no estimate at all (a range outside its limits)."""
    if path == "always_exact_near_ties":
        monkeypatch.setattr(histogram_search, "COARSE_TOLERANCE", 1.0)
        monkeypatch.setattr(histogram_search, "BOUND_MARGIN", 1e12)
    else:
        monkeypatch.setattr(histogram_search, "_ESTIMATE_RANGE", (0.0, 0.0))
    for kind in ("normal", "relu", "outliers"):
        obs, ref = HistogramObserver(), ao.HistogramObserver()
        for x in _batches(kind, shape=(32, 64), count=3, seed=5):
            obs(x)
            ref(x)
        _assert_histogram_qparams_close(obs.calculate_qparams(), ref.calculate_qparams())
        assert torch.equal(obs.calculate_qparams()[0], ref.calculate_qparams()[0])


@pytest.mark.parametrize(
    "scale, config",
    [
        (1e6, dict(dtype=torch.uint8)),
        (1e-6, dict(dtype=torch.int8)),
        (1.0, dict(dtype=torch.int16, qscheme=SYM)),
        (1.0, dict(dtype=torch.uint8, bins=3)),
    ],
    ids=["large", "small", "int16", "three_bins"],
)
def test_histogram_extreme_ranges_match_torch_ao(scale, config):
    obs, ref = HistogramObserver(**config), ao.HistogramObserver(**config)
    for x in _batches("normal", shape=(32, 32), count=2, seed=5):
        obs(x * scale)
        ref(x * scale)
    _assert_histogram_qparams_close(obs.calculate_qparams(), ref.calculate_qparams())


def test_quantile_steps_accumulate_like_a_python_loop():
    alphas, betas = histogram_search.quantile_steps()
    alpha, beta = 0.0, 1.0
    for k in range(len(alphas)):
        assert alphas[k] == alpha and betas[k] == beta
        alpha, beta = alpha + 1e-5, beta - 1e-5


# ----------------------------------------------------------------------------- histogram search
def _random_activation(kind: str, g: torch.Generator, numel: int) -> torch.Tensor:
    x = torch.randn(numel, generator=g)
    if kind == "relu":
        return torch.relu(x) * 3.0
    if kind == "gelu":
        return torch.nn.functional.gelu(x * 2.0 + 0.5)
    if kind == "heavy_tailed":
        return x / torch.rand(numel, generator=g).clamp_min(1e-3)  # Cauchy-like tails
    if kind == "outliers":
        x[torch.randint(0, numel, (5,), generator=g)] *= 60.0
        return x
    if kind == "sparse":
        return torch.randint(-4, 5, (numel,), generator=g).float() * 0.37  # nine values only
    if kind == "exponential":
        return torch.empty(numel).exponential_(generator=g)
    if kind == "zeros":
        return torch.zeros(numel)
    if kind == "constant":
        return torch.full((numel,), -2.5)
    return x


RANDOM_HISTOGRAM_CONFIGS = [
    dict(dtype=torch.uint8),
    dict(dtype=torch.int8),
    dict(dtype=torch.int8, qscheme=SYM),
    dict(dtype=torch.uint8, reduce_range=True),
    dict(dtype=torch.int8, quant_min=-127, quant_max=127, eps=2**-12),
    dict(dtype=torch.uint8, quant_min=0, quant_max=15),
    dict(dtype=torch.uint8, bins=256),
    dict(dtype=torch.int8, bins=1000),
]


@pytest.mark.parametrize(
    "kind", ["normal", "relu", "gelu", "heavy_tailed", "outliers", "sparse", "exponential", "zeros", "constant"]
)
def test_histogram_qparams_bit_identical_to_torch_ao_over_many_seeds(kind, search_path):
    """Random activations, one to three batches (the range grows, so the histogram is re-binned
    with the upsample path, or the single-value path when the first batch is constant): the
    search picks torch.ao's range, so scale and zero point are identical, bit for bit."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        config = RANDOM_HISTOGRAM_CONFIGS[seed % len(RANDOM_HISTOGRAM_CONFIGS)]
        obs, ref = HistogramObserver(**config), ao.HistogramObserver(**config)
        for batch in range(1 + seed % 3):
            x = _random_activation(kind, g, 2000 + 1500 * batch) * (1.0 + batch)
            if seed % 4 == 3 and batch == 0:
                x = torch.full((64,), 0.5)  # a constant first batch: the single-value re-binning
            obs(x)
            ref(x)
        assert torch.equal(obs.histogram, ref.histogram), (kind, seed)
        _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())


@pytest.mark.parametrize("seed", range(6))
def test_histogram_search_matches_torch_ao_on_set_histograms(seed, search_path):
    """Histograms set directly (spikes at the edges, long empty stretches, fractional counts)
    over ranges from tiny to huge: torch.ao's (min, max), bit for bit."""
    g = torch.Generator().manual_seed(100 + seed)
    bins = (2048, 2048, 512, 4096, 2048, 777)[seed]
    counts = torch.rand(bins, generator=g) * 100.0
    counts[torch.rand(bins, generator=g) < 0.3 * (seed % 3)] = 0.0
    counts[0] += 1e5 * (seed % 2)  # a ReLU-like spike in the first bin
    counts[-1] += 3e4 * (seed % 3 == 2)
    low = -(10.0 ** (seed - 3))
    for config in (dict(dtype=torch.uint8), dict(dtype=torch.int8, qscheme=SYM)):
        obs, ref = HistogramObserver(bins=bins, **config), ao.HistogramObserver(bins=bins, **config)
        for module in (obs, ref):
            module.histogram.copy_(counts)
            module.min_val.fill_(low)
            module.max_val.fill_(low + 7.25 * 10.0 ** (seed - 3))
        new_min, new_max = obs._non_linear_param_search()
        ao_min, ao_max = ref._non_linear_param_search()
        assert torch.equal(new_min, ao_min) and torch.equal(new_max, ao_max), (seed, config)


needs_kernel = pytest.mark.skipif(histogram_search._search_kernel is None, reason="built without a C compiler")


def test_compiled_search_is_built_where_a_c_compiler_is():
    import shutil
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) on this machine")
    assert histogram_search._search_kernel is not None, "qcore.observers._search_kernel was not built"


@needs_kernel
def test_compiled_search_matches_the_numpy_search(monkeypatch):
    """The same (start_bin, end_bin) as the numpy search, on random activations of every kind."""
    kinds = ["normal", "relu", "gelu", "heavy_tailed", "outliers", "sparse", "exponential"]
    results = {}
    for path in ("compiled", "numpy"):
        if path == "numpy":
            monkeypatch.setattr(histogram_search, "_search_kernel", None)
        found = []
        for seed in range(70):
            g = torch.Generator().manual_seed(seed)
            obs = HistogramObserver(**RANDOM_HISTOGRAM_CONFIGS[seed % len(RANDOM_HISTOGRAM_CONFIGS)])
            for batch in range(1 + seed % 2):
                obs(_random_activation(kinds[seed % len(kinds)], g, 3000))
            bin_width = (obs.max_val.item() - obs.min_val.item()) / obs.bins
            found.append(histogram_search.search_bin_range(obs.histogram, bin_width, obs.dst_nbins))
        results[path] = found
    assert results["compiled"] == results["numpy"]


@needs_kernel
def test_compiled_search_leaves_near_ties_to_python():
    """With a margin too wide to call any close step, the compiled search declines (None)."""
    obs = HistogramObserver()
    obs(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    counts = obs.histogram.numpy()
    bin_width = (obs.max_val.item() - obs.min_val.item()) / obs.bins
    alphas, betas = histogram_search._quantile_step_arrays()
    total = torch.sum(obs.histogram).item()
    search = histogram_search._search_kernel.search
    assert search(counts, total, bin_width, obs.dst_nbins, alphas, betas, 4.0, 2e-6, 4e-3) == (
        histogram_search._search_bin_range_in_python(obs.histogram, total, bin_width, obs.dst_nbins)
    )
    assert search(counts, total, bin_width, obs.dst_nbins, alphas, betas, 1e12, 2e-6, 1.0) is None


@needs_kernel
def test_compiled_search_rejects_bad_buffers():
    alphas, betas = histogram_search._quantile_step_arrays()
    search = histogram_search._search_kernel.search
    with pytest.raises(ValueError, match="one float32 per bin"):
        search(np.zeros(0, dtype=np.float32), 0.0, 1.0, 256, alphas, betas, 4.0, 2e-6, 4e-3)
    with pytest.raises(ValueError, match="the same number of float64 steps"):
        search(np.ones(8, dtype=np.float32), 8.0, 1.0, 256, alphas, betas[:-1], 4.0, 2e-6, 4e-3)
    with pytest.raises(TypeError):
        search([1.0, 2.0], 3.0, 1.0, 256, alphas, betas, 4.0, 2e-6, 4e-3)  # not a buffer


@pytest.mark.parametrize("skip_empty", [False, True])
def test_error_kernel_is_bit_identical_to_torch_ao_with_and_without_empty_bins(skip_empty):
    g = torch.Generator().manual_seed(7)
    ref = ao.HistogramObserver(dtype=torch.qint8)
    for x in _batches("outliers", shape=(64, 64), count=3):
        ref(x)
    assert (ref.histogram == 0).sum() > 1024  # most bins empty: the gathered-columns path
    bin_width = (ref.max_val.item() - ref.min_val.item()) / ref.bins
    ranges = [tuple(sorted(torch.randint(0, 2048, (2,), generator=g).tolist())) for _ in range(40)]
    ranges += [(0, 2047), (3, 3), (1000, 1255), (1000, 1127), (0, 1791)]
    density = ref.histogram.numpy() / np.float32(bin_width)
    errors = histogram_search.quantization_errors(
        density, bin_width, ref.dst_nbins, [r[0] for r in ranges], [r[1] for r in ranges], skip_empty=skip_empty
    )
    assert errors == [ref._compute_quantization_error(s, e) for s, e in ranges]


def test_float32_rounding_of_python_floats():
    assert histogram_search.to_float32(0.1) == float(np.float32(0.1))
    assert histogram_search.to_float32(1e39) == math.inf and histogram_search.to_float32(-1e39) == -math.inf
    assert histogram_search.to_float32(3.4028235e38) == float(np.finfo(np.float32).max)


def test_histogram_before_data_warns_and_returns_defaults():
    obs = HistogramObserver()
    assert not obs.has_observed()
    with pytest.warns(UserWarning, match="before the observer saw any data"):
        scale, zero_point = obs.calculate_qparams()
    assert scale.tolist() == [1.0] and zero_point.tolist() == [0]


def test_histogram_rejects_dynamic_and_per_channel():
    with pytest.raises(ValueError, match="is_dynamic"):
        HistogramObserver(is_dynamic=True)
    with pytest.raises(ValueError, match="per_tensor_affine"):
        HistogramObserver(qscheme=PC_AFF)


def test_histogram_state_dict_round_trip():
    obs = HistogramObserver(dtype=torch.int8)
    for x in _batches("normal"):
        obs(x)
    clone = HistogramObserver(dtype=torch.int8)
    clone.load_state_dict(obs.state_dict())
    _assert_same_qparams(clone.calculate_qparams(), obs.calculate_qparams())
    clone.reset_min_max_vals()
    assert not clone.has_observed() and float(clone.histogram.sum()) == 0.0


# ----------------------------------------------------------------------------- NaN / inf / empty
@pytest.mark.parametrize(
    "make",
    [
        lambda: MinMaxObserver(),
        lambda: MovingAverageMinMaxObserver(),
        lambda: PerChannelMinMaxObserver(ch_axis=1),
        lambda: MovingAveragePerChannelMinMaxObserver(),
        lambda: HistogramObserver(),
    ],
    ids=["minmax", "moving_average", "per_channel", "moving_average_per_channel", "histogram"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_data_raises_calibration_error_naming_the_node(make, bad):
    obs = make()
    obs(torch.randn(4, 3))
    obs.node_name = "linear_3"
    x = torch.randn(4, 3)
    x[1, 2] = bad
    kind = "NaN" if bad != bad else "inf"
    with pytest.raises(CalibrationError, match=rf"observer for node 'linear_3' saw {kind}"):
        obs(x)


def test_non_finite_error_without_node_name_names_the_class():
    with pytest.raises(CalibrationError, match="MinMaxObserver"):
        MinMaxObserver()(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize(
    "make",
    [MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver, HistogramObserver],
)
def test_empty_tensors_are_ignored(make):
    obs = make()
    empty = torch.empty(0, 3)
    assert obs(empty) is empty
    assert not obs.has_observed()
    obs(torch.tensor([[1.0, -2.0, 3.0]]))
    assert obs.has_observed()
    before = obs.calculate_qparams()
    obs(empty)
    _assert_same_qparams(obs.calculate_qparams(), before)


def test_uninitialized_minmax_warns_and_returns_defaults_like_torch_ao():
    with pytest.warns(UserWarning):
        scale, zero_point = MinMaxObserver().calculate_qparams()
    assert scale.tolist() == [1.0] and zero_point.tolist() == [0]


# ----------------------------------------------------------------------------- with_args
def test_with_args_chains_and_compares_by_value():
    ctor = MinMaxObserver.with_args(eps=2**-12).with_args(dtype=torch.int8, qscheme=SYM)
    assert isinstance(ctor, ObserverConstructor)
    assert ctor.cls is MinMaxObserver
    assert ctor.kwargs == {"eps": 2**-12, "dtype": torch.int8, "qscheme": SYM}
    same = MinMaxObserver.with_args(qscheme=SYM, dtype=torch.int8, eps=2**-12)
    assert ctor == same and hash(ctor) == hash(same)
    assert {ctor: 1}[same] == 1
    assert ctor != MinMaxObserver.with_args(eps=2**-12)
    assert ctor != HistogramObserver.with_args(eps=2**-12, dtype=torch.int8, qscheme=SYM)
    assert copy.deepcopy(ctor) == ctor and pickle.loads(pickle.dumps(ctor)) == ctor
    assert "MinMaxObserver.with_args(" in repr(ctor)


def test_with_args_builds_new_instances_and_call_kwargs_win():
    ctor = HistogramObserver.with_args(eps=2**-12, bins=512)
    first, second = ctor(), ctor(bins=256, dtype=torch.int8)
    assert first is not second
    assert first.bins == 512 and second.bins == 256 and second.dtype == torch.int8
    assert float(second.eps) == 2**-12


def test_with_args_equality_covers_nested_constructors_and_tensors():
    a = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1.0))
    b = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1.0))
    c = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=0.5))
    assert a == b and hash(a) == hash(b) and a != c
    t1 = FixedQParamsObserver.with_args(scale=torch.tensor([0.5]), zero_point=0)
    t2 = FixedQParamsObserver.with_args(scale=torch.tensor([0.5]), zero_point=0)
    assert t1 == t2 and hash(t1) == hash(t2)


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "cls", [MinMaxObserver, PerChannelMinMaxObserver, HistogramObserver, PlaceholderObserver, FixedQParamsObserver]
)
def test_unknown_kwargs_raise_type_error_naming_them(cls):
    args = {"scale": 0.1, "zero_point": 0} if cls is FixedQParamsObserver else {}
    with pytest.raises(TypeError, match=r"averagin_constant.*allowed: .*dtype"):
        cls(**args, averagin_constant=0.1)


def test_unknown_kwargs_through_with_args_and_fake_quantize():
    with pytest.raises(TypeError, match="bogus"):
        MinMaxObserver.with_args(bogus=1)()
    with pytest.raises(TypeError, match="bogus"):
        FakeQuantize(observer=MovingAverageMinMaxObserver, bogus=1)


@pytest.mark.parametrize(
    "dtype, quant_min, quant_max, message",
    [
        (torch.int8, -129, 127, r"quant_min=-129 is outside the range of torch.int8; allowed: -128"),
        (torch.int8, -128, 128, r"quant_max=128 is outside the range of torch.int8; allowed: .*127"),
        (torch.uint8, 0, 256, r"quant_max=256 is outside the range of torch.uint8; allowed: 0 <="),
        (torch.uint8, 1, 255, r"must include 0"),
        (torch.int8, 0, 0, r"strictly less than"),
    ],
)
def test_bad_quant_range_raises_value_error_with_the_allowed_range(dtype, quant_min, quant_max, message):
    with pytest.raises(ValueError, match=message):
        MinMaxObserver(dtype=dtype, quant_min=quant_min, quant_max=quant_max)
    with pytest.raises(ValueError, match=message):
        HistogramObserver(dtype=dtype, quant_min=quant_min, quant_max=quant_max)


def test_quantized_dtypes_map_to_plain_dtypes():
    for qtype, plain in [(torch.quint8, torch.uint8), (torch.qint8, torch.int8), (torch.qint32, torch.int32)]:
        obs = MinMaxObserver(dtype=qtype, qscheme=SYM)
        assert obs.dtype == plain
        ref = ao.MinMaxObserver(dtype=qtype, qscheme=SYM)
        x = torch.randn(10)
        obs(x), ref(x)
        _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())


def test_unsupported_dtype_and_qscheme_are_rejected():
    with pytest.raises(TypeError, match="dtype torch.float32 is not supported; allowed"):
        MinMaxObserver(dtype=torch.float32)
    with pytest.raises(ValueError, match="qscheme torch.per_channel_affine is not supported"):
        MinMaxObserver(qscheme=PC_AFF)
    with pytest.raises(ValueError, match="per_channel_symmetric"):
        PerChannelMinMaxObserver(qscheme=SYM)
    with pytest.raises(ValueError, match="is_dynamic"):
        PerChannelMinMaxObserver(is_dynamic=True)


def test_common_attributes_are_exposed():
    obs = PerChannelMinMaxObserver(ch_axis=1, dtype=torch.int8, qscheme=PC_SYM, eps=2**-12)
    assert obs.dtype == torch.int8 and obs.qscheme == PC_SYM and obs.ch_axis == 1
    assert (obs.quant_min, obs.quant_max) == (-128, 127)
    assert obs.is_dynamic is False and obs.node_name is None and float(obs.eps) == 2**-12
    assert MinMaxObserver(dtype=torch.uint8, reduce_range=True).quant_max == 127


# ----------------------------------------------------------------------------- state
def test_per_channel_state_dict_round_trip_and_reset():
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.int8, qscheme=PC_SYM)
    obs(torch.randn(5, 7))
    clone = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.int8, qscheme=PC_SYM)
    clone.load_state_dict(obs.state_dict())
    _assert_same_qparams(clone.calculate_qparams(), obs.calculate_qparams())
    clone.reset_min_max_vals()
    assert not clone.has_observed()


def test_float64_observer_uses_the_tensor_path_and_still_matches():
    obs, ref = MinMaxObserver(dtype=torch.int8).to(torch.float64), ao.MinMaxObserver(dtype=torch.int8).to(torch.float64)
    for x in _batches("exponential"):
        obs(x.double()), ref(x.double())
    _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())


def test_minmax_buffers_follow_to_and_deepcopy():
    obs = MinMaxObserver()
    obs(torch.tensor([-1.0, 1.0]))
    moved = copy.deepcopy(obs).to(torch.float64)
    assert moved.min_val.dtype == torch.float64 and float(moved.min_val) == -1.0
    assert set(obs.state_dict()) == {"eps", "min_val", "max_val"}


# ----------------------------------------------------------------------------- placeholder / fixed
def test_placeholder_is_identity_and_has_no_qparams():
    obs = PlaceholderObserver(dtype=torch.int8, is_dynamic=True, eps=2**-12)
    assert (obs.quant_min, obs.quant_max, obs.qscheme, obs.eps) == (-128, 127, AFF, 2**-12)
    assert not obs.has_observed()
    x = torch.randn(3)
    assert obs(x) is x and obs.has_observed()
    with pytest.raises(RuntimeError, match="computed at run time"):
        obs.calculate_qparams()
    fp16 = PlaceholderObserver(dtype=torch.float16)
    assert fp16.quant_min is None and not fp16.is_dynamic
    with pytest.raises(RuntimeError, match="cast"):
        fp16.calculate_qparams()


def test_placeholder_compute_dtype_means_dynamic():
    with pytest.warns(UserWarning, match="is_dynamic"):
        obs = PlaceholderObserver(dtype=torch.uint8, compute_dtype=torch.uint8)
    assert obs.is_dynamic


def test_fixed_qparams_observer_matches_torch_ao():
    obs = FixedQParamsObserver(scale=2.0 / 256.0, zero_point=128, dtype=torch.uint8, quant_min=0, quant_max=255)
    ref = ao.FixedQParamsObserver(scale=2.0 / 256.0, zero_point=128, dtype=torch.quint8, quant_min=0, quant_max=255)
    x = torch.randn(4)
    assert obs(x) is x and obs.has_observed()
    _assert_same_qparams(obs.calculate_qparams(), ref.calculate_qparams())
    signed = FixedQParamsObserver(scale=1.0 / 128.0, zero_point=0, dtype=torch.int8)
    assert (signed.quant_min, signed.quant_max) == (-128, 127)
    with pytest.raises(ValueError, match="zero_point=300"):
        FixedQParamsObserver(scale=0.1, zero_point=300)


# ----------------------------------------------------------------------------- derived
def _bias_scale(observers):
    (act_scale, _), (weight_scale, _) = (o.calculate_qparams() for o in observers)
    scale = act_scale * weight_scale
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def test_derived_is_identity_and_derives_from_its_sources():
    act, weight = MinMaxObserver(), PerChannelMinMaxObserver(dtype=torch.int8, qscheme=PC_SYM)
    derived = DerivedObserverOrFakeQuantize(
        torch.int32, [act, weight], _bias_scale, qscheme=PC_SYM, ch_axis=0
    )
    assert not derived.has_observed()
    act(torch.tensor([0.0, 2.55]))
    weight(torch.randn(3, 4))
    assert derived.has_observed()
    x = torch.randn(3)
    assert derived(x) is x
    scale, zero_point = derived.calculate_qparams()
    assert torch.equal(scale, act.calculate_qparams()[0] * weight.calculate_qparams()[0])
    assert (derived.quant_min, derived.quant_max) == (-(2**31), 2**31 - 1)
    assert list(derived.children()) == []


def test_derived_per_channel_needs_ch_axis():
    with pytest.raises(ValueError, match="ch_axis"):
        DerivedObserverOrFakeQuantize(torch.int32, [], _bias_scale, qscheme=PC_SYM)


# ----------------------------------------------------------------------------- recognising observers
def test_is_observer_or_fake_quant_knows_both_families():
    mine = [
        MinMaxObserver(),
        HistogramObserver(),
        PlaceholderObserver(),
        FixedQParamsObserver(0.1, 0),
        FakeQuantize(),
        DerivedObserverOrFakeQuantize(torch.int32, [], _bias_scale),
    ]
    theirs = [
        ao.MinMaxObserver(),
        ao.PlaceholderObserver(),
        AoFakeQuantize(),
        _DerivedObserverOrFakeQuantize(torch.int32, [], _bias_scale),
    ]
    assert all(is_observer_or_fake_quant(m) for m in mine + theirs)
    assert not any(is_observer_or_fake_quant(m) for m in [torch.nn.ReLU(), torch.nn.Linear(2, 2), object()])


def test_importing_observers_does_not_import_inductor():
    code = (
        "import sys, qcore\n"
        "before = 'torch._inductor' in sys.modules\n"
        "import qcore.observers\n"
        "assert before or 'torch._inductor' not in sys.modules, 'qcore.observers imported torch._inductor'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
