"""qcore fake-quantizers against torch.ao's: same outputs, gradients and qparams, step by step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.ao.quantization import fake_quantize as ao_fq
from torch.ao.quantization import observer as ao

from qcore.errors import CalibrationError
from qcore.observers import (
    FakeQuantize,
    FixedQParamsFakeQuantize,
    FixedQParamsObserver,
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)

SYM, AFF = torch.per_tensor_symmetric, torch.per_tensor_affine
PC_SYM, PC_AFF = torch.per_channel_symmetric, torch.per_channel_affine


@pytest.fixture(autouse=True)
def _quiet_torch_ao_reduce_range_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduce_range.*")
        yield


def _inputs(steps: int = 5, shape=(4, 3, 6), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        x = torch.randn(shape, generator=g) * (1.0 + 0.3 * i) + 0.2 * i
        if i == 2:
            x.view(-1)[0] = 6.0  # an outlier in one step
        out.append(x)
    return out


def _run_side_by_side(ours: torch.nn.Module, theirs: torch.nn.Module, inputs: list[torch.Tensor]) -> None:
    """Train-mode steps: same output, same input gradient, same qparams buffers after each."""
    ours.train()
    theirs.train()
    upstream = torch.linspace(-1.0, 1.0, inputs[0].numel()).view(inputs[0].shape)
    for x in inputs:
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        assert torch.equal(y_ours, y_theirs)
        (y_ours * upstream).sum().backward()
        (y_theirs * upstream).sum().backward()
        assert torch.equal(x_ours.grad, x_theirs.grad)
        assert torch.equal(ours.scale, theirs.scale)
        assert torch.equal(ours.zero_point, theirs.zero_point)


FAKE_QUANT_CASES = {
    "per_tensor_affine_uint8": (
        dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8),
        dict(observer=ao.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8),
    ),
    "per_tensor_symmetric_int8_eps": (
        dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8, qscheme=SYM, eps=2**-12),
        dict(observer=ao.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=SYM, eps=2**-12),
    ),
    "dynamic_averaging_one": (
        dict(observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1), quant_min=-128, quant_max=127, dtype=torch.int8, is_dynamic=True),
        dict(observer=ao.MovingAverageMinMaxObserver.with_args(averaging_constant=1), quant_min=-128, quant_max=127, dtype=torch.qint8, is_dynamic=True),
    ),
    "per_tensor_reduce_range": (
        dict(observer=MovingAverageMinMaxObserver, dtype=torch.uint8, reduce_range=True, averaging_constant=0.5),
        dict(observer=ao.MovingAverageMinMaxObserver, dtype=torch.quint8, reduce_range=True, averaging_constant=0.5),
    ),
    "per_channel_symmetric_int8": (
        dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8, qscheme=PC_SYM, ch_axis=0),
        dict(observer=ao.MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=PC_SYM, ch_axis=0),
    ),
    "per_channel_affine_uint8_axis1": (
        dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8, qscheme=PC_AFF, ch_axis=1),
        dict(observer=ao.MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=PC_AFF, ch_axis=1),
    ),
    "minmax_observer": (
        dict(observer=MinMaxObserver, dtype=torch.int8, qscheme=SYM),
        dict(observer=ao.MinMaxObserver, dtype=torch.qint8, qscheme=SYM),
    ),
    "histogram_observer": (
        dict(observer=HistogramObserver.with_args(bins=256), quant_min=0, quant_max=255, dtype=torch.uint8),
        dict(observer=ao.HistogramObserver.with_args(bins=256), quant_min=0, quant_max=255, dtype=torch.quint8),
    ),
}


@pytest.mark.parametrize("case", list(FAKE_QUANT_CASES))
def test_fake_quantize_matches_torch_ao_step_by_step(case):
    ours_kwargs, theirs_kwargs = FAKE_QUANT_CASES[case]
    ours, theirs = FakeQuantize(**ours_kwargs), ao_fq.FakeQuantize(**theirs_kwargs)
    assert (ours.quant_min, ours.quant_max, ours.ch_axis) == (theirs.quant_min, theirs.quant_max, theirs.ch_axis)
    _run_side_by_side(ours, theirs, _inputs())
    # frozen qparams, then plain pass-through, on both
    for module in (ours, theirs):
        module.disable_observer()
    _run_side_by_side(ours, theirs, _inputs(steps=2, seed=1))
    for module in (ours, theirs):
        module.disable_fake_quant()
    x = torch.randn(4, 3, 6)
    assert torch.equal(ours(x), x) and torch.equal(theirs(x), x)


FUSED_CASES = {
    "per_tensor_affine_uint8": (
        dict(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8),
        dict(observer=ao.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8),
    ),
    "per_tensor_symmetric_int8_eps": (
        dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8, qscheme=SYM, eps=2**-12),
        dict(observer=ao.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=SYM, eps=2**-12),
    ),
    "per_channel_symmetric_int8": (
        dict(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8, qscheme=PC_SYM),
        dict(observer=ao.MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=PC_SYM),
    ),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_moving_average_fake_quantize_matches_torch_ao(case):
    ours_kwargs, theirs_kwargs = FUSED_CASES[case]
    ours, theirs = FusedMovingAvgObsFakeQuantize(**ours_kwargs), ao_fq.FusedMovingAvgObsFakeQuantize(**theirs_kwargs)
    _run_side_by_side(ours, theirs, _inputs())
    assert torch.equal(ours.activation_post_process.min_val, theirs.activation_post_process.min_val)
    assert torch.equal(ours.activation_post_process.max_val, theirs.activation_post_process.max_val)
    for module in (ours, theirs):
        module.disable_observer()
    _run_side_by_side(ours, theirs, _inputs(steps=2, seed=2))


def test_fixed_qparams_fake_quantize_matches_torch_ao():
    ours = FixedQParamsFakeQuantize(
        observer=FixedQParamsObserver.with_args(scale=1.0 / 256.0, zero_point=0, dtype=torch.uint8, quant_min=0, quant_max=255)
    )
    theirs = ao_fq.FixedQParamsFakeQuantize(
        observer=ao.FixedQParamsObserver.with_args(scale=1.0 / 256.0, zero_point=0, dtype=torch.quint8, quant_min=0, quant_max=255)
    )
    _run_side_by_side(ours, theirs, [torch.sigmoid(x) for x in _inputs()])
    assert ours.has_observed()
    scale, zero_point = ours.calculate_qparams()
    assert scale.tolist() == [1.0 / 256.0] and zero_point.tolist() == [0]


def test_fixed_qparams_fake_quantize_needs_a_fixed_observer():
    with pytest.raises(TypeError, match="FixedQParamsObserver"):
        FixedQParamsFakeQuantize(observer=MovingAverageMinMaxObserver)


def test_fused_needs_a_moving_average_observer():
    with pytest.raises(TypeError, match="MovingAverageMinMaxObserver"):
        FusedMovingAvgObsFakeQuantize(observer=MinMaxObserver)


# ----------------------------------------------------------------------------- switches
def test_apply_helpers_switch_qcore_and_torch_ao_fake_quantizers():
    model = torch.nn.Sequential(
        FakeQuantize(),
        ao_fq.FakeQuantize(),
        FusedMovingAvgObsFakeQuantize(),
        ao_fq.FusedMovingAvgObsFakeQuantize(),
        torch.nn.ReLU(),
        MinMaxObserver(),
    )
    fake_quants = list(model)[:4]
    model.apply(disable_observer)
    assert all(int(m.observer_enabled[0]) == 0 for m in fake_quants)
    model.apply(disable_fake_quant)
    assert all(int(m.fake_quant_enabled[0]) == 0 for m in fake_quants)
    model.apply(enable_observer)
    model.apply(enable_fake_quant)
    assert all(int(m.observer_enabled[0]) == 1 and int(m.fake_quant_enabled[0]) == 1 for m in fake_quants)


def test_disabled_observer_keeps_qparams_and_disabled_fake_quant_is_identity():
    fq = FakeQuantize(dtype=torch.int8, quant_min=-128, quant_max=127, averaging_constant=1.0)
    fq(torch.tensor([-1.0, 1.0]))
    scale = fq.scale.clone()
    fq.disable_observer()
    fq(torch.tensor([-10.0, 10.0]))
    assert torch.equal(fq.scale, scale)
    fq.disable_fake_quant()
    x = torch.tensor([0.123, -7.0])
    assert torch.equal(fq(x), x)


# ----------------------------------------------------------------------------- errors
def test_fake_quantize_nan_raises_calibration_error_naming_the_node():
    fq = FakeQuantize()
    fq.node_name = "conv2d_1"
    assert fq.activation_post_process.node_name == "conv2d_1"
    with pytest.raises(CalibrationError, match="node 'conv2d_1' saw NaN"):
        fq(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("bad, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_fused_fake_quantize_non_finite_raises_calibration_error(bad, kind):
    fq = FusedMovingAvgObsFakeQuantize()
    fq(torch.randn(8))
    fq.node_name = "linear_7"
    with pytest.raises(CalibrationError, match=f"node 'linear_7' saw {kind}"):
        fq(torch.tensor([1.0, bad]))


def test_bad_ranges_and_kwargs():
    with pytest.raises(ValueError, match="quant_min .* must be <= quant_max"):
        FakeQuantize(quant_min=10, quant_max=0)
    with pytest.raises(ValueError, match="outside the range of torch.int8"):
        FakeQuantize(dtype=torch.int8, quant_min=-128, quant_max=255)
    with pytest.raises(TypeError, match="not_an_arg"):
        FusedMovingAvgObsFakeQuantize(not_an_arg=3)


# ----------------------------------------------------------------------------- construction and state
def test_with_args_builds_fake_quantizers_and_compares_by_value():
    ctor = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12).with_args(
        dtype=torch.int8, quant_min=-128, quant_max=127
    )
    assert ctor == FakeQuantize.with_args(
        dtype=torch.int8, quant_min=-128, quant_max=127, observer=MovingAverageMinMaxObserver, eps=2**-12
    )
    fq = ctor(qscheme=SYM)
    assert isinstance(fq.activation_post_process, MovingAverageMinMaxObserver)
    assert fq.dtype == torch.int8 and fq.qscheme == SYM and float(fq.activation_post_process.eps) == 2**-12


def test_fake_quantize_accepts_torch_ao_observers():
    ours = FakeQuantize(observer=ao.MovingAverageMinMaxObserver, dtype=torch.quint8)
    theirs = ao_fq.FakeQuantize(observer=ao.MovingAverageMinMaxObserver, dtype=torch.quint8)
    assert ours.dtype == torch.uint8
    _run_side_by_side(ours, theirs, _inputs(steps=3))


def test_attributes_and_has_observed():
    fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.int8, qscheme=PC_SYM, ch_axis=1)
    assert (fq.dtype, fq.qscheme, fq.ch_axis, fq.is_dynamic) == (torch.int8, PC_SYM, 1, False)
    assert (fq.quant_min, fq.quant_max) == (-128, 127)
    assert not fq.has_observed()
    fq(torch.randn(2, 5))
    assert fq.has_observed() and fq.scale.shape == (5,)


def test_per_channel_state_dict_round_trip():
    fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.int8, qscheme=PC_SYM)
    for x in _inputs(steps=2):
        fq(x)
    fresh = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, dtype=torch.int8, qscheme=PC_SYM)
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh.scale, fq.scale) and torch.equal(fresh.zero_point, fq.zero_point)
    x = torch.randn(4, 3, 6)
    fresh.disable_observer(), fq.disable_observer()
    assert torch.equal(fresh(x), fq(x))
    assert torch.equal(copy.deepcopy(fq)(x), fq(x))


def test_fused_moving_average_fake_quant_on_axis_1_takes_the_unfused_path():
    """torch.fused_moving_avg_obs_fake_quant supports per-channel axis 0 only; on axis 1 (a
    transposed conv's weight) qcore's fused class gives torch.ao's unfused FakeQuantize results."""
    from torch.ao.quantization import FakeQuantize as AoFakeQuantize
    from torch.ao.quantization import MovingAveragePerChannelMinMaxObserver as AoMovingAveragePerChannel

    from qcore.observers import FusedMovingAvgObsFakeQuantize, MovingAveragePerChannelMinMaxObserver

    kwargs = dict(quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=1)
    fused = FusedMovingAvgObsFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, **kwargs)
    oracle = AoFakeQuantize(observer=AoMovingAveragePerChannel, **kwargs)
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        w = (torch.randn(4, 6, 3, 3, generator=generator) * (step + 1)).requires_grad_()
        w_oracle = w.detach().clone().requires_grad_()
        out, expected = fused(w), oracle(w_oracle)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        (expected * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        torch.testing.assert_close(w.grad, w_oracle.grad)  # straight-through, same clamp mask
    assert fused.scale.shape == (6,)
    torch.testing.assert_close(fused.scale, oracle.scale)
    fused.disable_observer()
    before = fused.activation_post_process.max_val.clone()
    fused(torch.randn(4, 6, 3, 3) * 10)
    assert torch.equal(fused.activation_post_process.max_val, before)  # observer off: statistics kept
