"""get_symmetric_quantization_config and the supported-operator introspection of XNNPACKQuantizer."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from qcore import observers
from qcore.spec import ctor_key
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

EPS = 2**-12


def _ctor(spec):
    """(class, {kwargs}) of a spec's observer constructor, nested observers resolved too."""
    cls, kwargs = ctor_key(spec.observer_or_fake_quant_ctr)
    return cls, dict(kwargs)


def test_default_config():
    cfg = get_symmetric_quantization_config()
    act, weight = cfg.input_activation, cfg.weight
    assert (act.dtype, act.quant_min, act.quant_max, act.qscheme, act.is_dynamic) == (
        torch.int8, -128, 127, torch.per_tensor_affine, False)
    assert _ctor(act) == (observers.HistogramObserver, {"eps": EPS})
    assert (weight.dtype, weight.quant_min, weight.quant_max, weight.qscheme, weight.ch_axis) == (
        torch.int8, -127, 127, torch.per_tensor_symmetric, 0)
    assert _ctor(weight) == (observers.MinMaxObserver, {"eps": EPS})
    assert cfg.bias is None and cfg.output_activation is cfg.input_activation and cfg.is_qat is False


def test_per_channel_weights():
    weight = get_symmetric_quantization_config(is_per_channel=True).weight
    assert weight.qscheme == torch.per_channel_symmetric and weight.ch_axis == 0
    assert _ctor(weight) == (observers.PerChannelMinMaxObserver, {"eps": EPS})


def test_qat_fake_quantizers():
    cfg = get_symmetric_quantization_config(is_qat=True)
    assert cfg.is_qat
    assert _ctor(cfg.input_activation) == (observers.FusedMovingAvgObsFakeQuantize, {"eps": EPS})
    cls, kwargs = _ctor(cfg.weight)
    assert cls is observers.FusedMovingAvgObsFakeQuantize and kwargs["observer"] == ctor_key(observers.MovingAverageMinMaxObserver)
    cls, kwargs = _ctor(get_symmetric_quantization_config(is_qat=True, is_per_channel=True).weight)
    assert kwargs["observer"] == ctor_key(observers.MovingAveragePerChannelMinMaxObserver)


def test_dynamic_configs():
    cfg = get_symmetric_quantization_config(is_dynamic=True)
    assert cfg.input_activation.is_dynamic and cfg.output_activation is None
    assert _ctor(cfg.input_activation) == (observers.PlaceholderObserver, {"eps": EPS})
    cls, kwargs = _ctor(get_symmetric_quantization_config(is_dynamic=True, is_qat=True).input_activation)
    assert cls is observers.FakeQuantize
    assert kwargs["observer"] == ctor_key(observers.MovingAverageMinMaxObserver.with_args(averaging_constant=1))


def test_configs_are_memoised_and_take_custom_ranges():
    assert get_symmetric_quantization_config() is get_symmetric_quantization_config()
    cfg = get_symmetric_quantization_config(act_qmin=-100, act_qmax=100, weight_qmin=-50, weight_qmax=50)
    assert (cfg.input_activation.quant_min, cfg.input_activation.quant_max) == (-100, 100)
    assert (cfg.weight.quant_min, cfg.weight.quant_max) == (-50, 50)


def test_supported_configs_and_operators():
    assert len(XNNPACKQuantizer.supported_config_and_operators) == 20
    assert len(XNNPACKQuantizer.get_supported_operators()) == 20
    configs = XNNPACKQuantizer.get_supported_quantization_configs()
    assert len(configs) == 4
    assert len(XNNPACKQuantizer.get_supported_operator_for_quantization_config(None)) == 44
    conv_patterns = [[torch.nn.Conv2d, torch.nn.ReLU], [torch.nn.Conv2d, F.relu], [F.conv2d, torch.nn.ReLU], [F.conv2d, F.relu]]
    for cfg in configs:
        assert XNNPACKQuantizer.get_supported_operator_for_quantization_config(cfg) == conv_patterns


def test_a_freshly_built_equal_config_is_found_by_value():
    fresh = copy.deepcopy(get_symmetric_quantization_config(is_per_channel=True))
    assert fresh is not get_symmetric_quantization_config(is_per_channel=True)
    assert len(XNNPACKQuantizer.get_supported_operator_for_quantization_config(fresh)) == 4
    other = get_symmetric_quantization_config(is_dynamic=True)
    assert XNNPACKQuantizer.get_supported_operator_for_quantization_config(other) == []


def test_validate_never_raises():
    assert XNNPACKQuantizer().validate(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())) is None
