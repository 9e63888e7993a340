"""The data model: construction, validation messages, immutability, value equality."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch.ao.quantization import observer as ao_observer

import qcore
from qcore.spec import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationConfig,
    QuantizationSpec,
    SharedQuantizationSpec,
    get_input_act_qspec,
    get_weight_qspec,
)

OBS = ao_observer.MinMaxObserver


def spec(**overrides):
    fields = dict(dtype=torch.int8, observer_or_fake_quant_ctr=OBS)
    fields.update(overrides)
    return QuantizationSpec(**fields)


@pytest.fixture(scope="module")
def nodes():
    gm = torch.export.export(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.ReLU()), (torch.randn(2),)).module()
    return [n for n in gm.graph.nodes if n.op == "call_function"]


INVALID = [
    (dict(dtype=torch.quint8), TypeError, r"unsupported dtype torch.quint8 \(use the plain dtype, e.g. torch.uint8.*allowed: torch.uint8, torch.int8"),
    (dict(dtype="int8"), TypeError, r"unsupported dtype 'int8'; allowed: torch.uint8"),
    (dict(dtype=torch.bfloat16), TypeError, r"unsupported dtype torch.bfloat16; allowed"),
    (dict(quant_min=10, quant_max=-10), ValueError, r"quant_min \(10\) must be <= quant_max \(-10\)"),
    (dict(quant_min=-129), ValueError, r"quant_min=-129 is outside the range of torch.int8; allowed: -128 .. 127"),
    (dict(dtype=torch.uint8, quant_max=256), ValueError, r"quant_max=256 is outside the range of torch.uint8; allowed: 0 .. 255"),
    (dict(quant_min=1.5), TypeError, r"quant_min must be an int or None, got 1.5"),
    (dict(qscheme="symmetric"), ValueError, r"unsupported qscheme 'symmetric'; allowed: torch.per_tensor_affine"),
    (dict(ch_axis=-1), ValueError, r"ch_axis=-1 is negative"),
    (dict(dtype=torch.float16, qscheme=torch.per_tensor_affine), ValueError, r"needs an integer or float8 dtype.*torch.float16 takes qscheme=None"),
    (dict(dtype=torch.float32, quant_min=0), ValueError, r"quant_min/quant_max only apply to integer and float8 dtypes"),
    (dict(observer_or_fake_quant_ctr="MinMaxObserver"), TypeError, r"observer_or_fake_quant_ctr must be an observer or fake-quantize class"),
    (dict(is_dynamic=1), TypeError, r"is_dynamic must be True or False"),
    (dict(is_dynamic=True, qscheme=torch.per_channel_affine, ch_axis=0), ValueError, r"is_dynamic=True is for activations"),
]


@pytest.mark.parametrize("overrides,error,message", INVALID, ids=[m[:40] for _, _, m in INVALID])
def test_invalid_quantization_spec(overrides, error, message):
    with pytest.raises(error, match=message):
        spec(**overrides)


def test_valid_specs_and_equal_quant_range():
    assert spec(quant_min=3, quant_max=3).quant_min == 3
    s = spec(qscheme=torch.per_channel_symmetric, ch_axis=0)
    assert s.ch_axis == 0
    assert spec(dtype=torch.float16).qscheme is None


def test_specs_are_frozen():
    s = spec()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.dtype = torch.uint8


def test_specs_compare_by_value_including_with_args():
    a = spec(observer_or_fake_quant_ctr=ao_observer.HistogramObserver.with_args(eps=2**-12))
    b = spec(observer_or_fake_quant_ctr=ao_observer.HistogramObserver.with_args(eps=2**-12))
    c = spec(observer_or_fake_quant_ctr=ao_observer.HistogramObserver.with_args(eps=2**-10))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert QuantizationConfig(a, a, None, None) == QuantizationConfig(b, b, None, None)


FIXED_INVALID = [
    (dict(dtype=torch.float32), TypeError, r"dtype must be an integer dtype"),
    (dict(scale=0.0), ValueError, r"scale must be a positive float, got 0.0"),
    (dict(zero_point=300), ValueError, r"zero_point=300 is outside the quantized range; allowed: -128 .. 127"),
    (dict(zero_point=0.5), TypeError, r"zero_point must be an int"),
    (dict(qscheme=torch.per_channel_affine), ValueError, r"needs ch_axis|must be per-tensor"),
]


@pytest.mark.parametrize("overrides,error,message", FIXED_INVALID)
def test_invalid_fixed_qparams_spec(overrides, error, message):
    fields = dict(dtype=torch.int8, scale=1 / 256, zero_point=-128)
    fields.update(overrides)
    with pytest.raises(error, match=message):
        FixedQParamsQuantizationSpec(**fields)


def test_shared_spec_needs_a_node_or_an_edge(nodes):
    a, b = nodes
    assert SharedQuantizationSpec(a).edge_or_node is a
    assert SharedQuantizationSpec((a, b)).edge_or_node == (a, b)
    with pytest.raises(TypeError, match=r"expected a Node \(a node's output\) or a \(producer, consumer\) pair"):
        SharedQuantizationSpec("relu")
    with pytest.raises(TypeError, match="pair of Nodes"):
        SharedQuantizationSpec((a, b, a))


def test_derived_spec_validation(nodes):
    a, b = nodes
    fn = lambda observers: (torch.tensor([1.0]), torch.tensor([0]))  # noqa: E731
    ok = DerivedQuantizationSpec(derived_from=[(a, b)], derive_qparams_fn=fn, dtype=torch.int32)
    assert ok.derived_from == [(a, b)]
    with pytest.raises(ValueError, match="derived_from is empty"):
        DerivedQuantizationSpec(derived_from=[], derive_qparams_fn=fn, dtype=torch.int32)
    with pytest.raises(TypeError, match="derive_qparams_fn must be callable"):
        DerivedQuantizationSpec(derived_from=[a], derive_qparams_fn=None, dtype=torch.int32)
    with pytest.raises(ValueError, match="per-channel qscheme .* needs ch_axis"):
        DerivedQuantizationSpec(derived_from=[a], derive_qparams_fn=fn, dtype=torch.int32, qscheme=torch.per_channel_symmetric)


def test_annotation_defaults_and_validation(nodes):
    a, _ = nodes
    first, second = QuantizationAnnotation(), QuantizationAnnotation()
    first.input_qspec_map[a] = spec()
    assert second.input_qspec_map == {}  # a fresh dict per instance
    assert QuantizationAnnotation(_annotated=True)._annotated is True
    with pytest.raises(TypeError, match="input_qspec_map keys must be Nodes"):
        QuantizationAnnotation(input_qspec_map={"x": spec()})
    with pytest.raises(TypeError, match="output_qspec must be a QuantizationSpec"):
        QuantizationAnnotation(output_qspec="int8")


def test_config_accessors_check_schemes():
    per_channel = spec(qscheme=torch.per_channel_affine, ch_axis=0)
    with pytest.raises(ValueError, match="not supported for activations; allowed: torch.per_tensor_affine, torch.per_tensor_symmetric"):
        get_input_act_qspec(QuantizationConfig(input_activation=per_channel))
    with pytest.raises(ValueError, match="not supported for weights; allowed: torch.per_tensor_symmetric, torch.per_channel_symmetric"):
        get_weight_qspec(QuantizationConfig(weight=spec(qscheme=torch.per_tensor_affine)))
    with pytest.raises(TypeError, match="is_qat must be True or False"):
        QuantizationConfig(is_qat="yes")
    with pytest.raises(TypeError, match="QuantizationConfig.weight must be a QuantizationSpec"):
        QuantizationConfig(weight=torch.int8)


def test_public_names_match_the_old_flow():
    for name in (
        "QuantizationSpec",
        "FixedQParamsQuantizationSpec",
        "SharedQuantizationSpec",
        "DerivedQuantizationSpec",
        "QuantizationAnnotation",
        "QuantizationConfig",
        "prepare_pt2e",
        "prepare_qat_pt2e",
        "convert_pt2e",
    ):
        assert hasattr(qcore, name)
