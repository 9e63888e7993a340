"""float8 quantization specs (``QuantizationSpec(dtype=torch.float8_e4m3fn / float8_e5m2)``):
accepted by the data model and qcore's observers, converted to ``quantize_per_tensor`` /
``dequantize_per_tensor`` with the float8 dtype (the q/dq counts of torchao 0.18's
``test_quantization_dtype``), for float32 and bfloat16 models; refused with one line where a
kernel cannot run float8."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.ao.quantization import observer as ao_observer

import qcore
from qcore.annotation import annotate_input, annotate_output, mark_annotated
from qcore.observers import FakeQuantize, HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationSpec
from qcore.testing.graph_ops import assert_graph_ops

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
qd = torch.ops.quantized_decomposed


def float8_spec(dtype: torch.dtype, observer=MinMaxObserver) -> QuantizationSpec:
    info = torch.finfo(dtype)
    return QuantizationSpec(
        dtype=dtype,
        observer_or_fake_quant_ctr=observer,
        quant_min=int(info.min),
        quant_max=int(info.max),
        qscheme=torch.per_tensor_affine,
    )


INT8_WEIGHT = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=MinMaxObserver,
    quant_min=-128,
    quant_max=127,
    qscheme=torch.per_tensor_symmetric,
)


class ConvFloat8Quantizer(Quantizer):
    """The quantizer of torchao's test_quantization_dtype: float8 activations, int8 weight."""

    def __init__(self, act: QuantizationSpec, weight: QuantizationSpec = INT8_WEIGHT) -> None:
        self.act, self.weight = act, weight

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.conv2d.default:
                annotate_input(node, node.args[0], self.act)
                annotate_input(node, node.args[1], self.weight)
                annotate_output(node, self.act)
                mark_annotated([node])
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


def _quantize(model: torch.nn.Module, x: torch.Tensor, quantizer: Quantizer) -> torch.fx.GraphModule:
    exported = torch.export.export(copy.deepcopy(model).eval(), (x,)).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    prepared(x)
    return qcore.convert_pt2e(prepared)


def _float8_ulp(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of the float8 grid at each value of ``q`` (as float32)."""
    mantissa_bits = 3 if dtype == torch.float8_e4m3fn else 2
    smallest_normal_exp = -6 if dtype == torch.float8_e4m3fn else -14
    exponent = torch.floor(torch.log2(q.abs().clamp_min(2.0**smallest_normal_exp)))
    return 2.0 ** (exponent - mantissa_bits)


@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_spec_is_accepted_with_its_range(dtype):
    spec = float8_spec(dtype)
    assert spec.dtype == dtype and spec.quant_max == int(torch.finfo(dtype).max)
    with pytest.raises(ValueError, match=r"quant_max=1000000 is outside the range of torch.float8"):
        QuantizationSpec(dtype=dtype, observer_or_fake_quant_ctr=MinMaxObserver, quant_min=0, quant_max=1_000_000)
    with pytest.raises(ValueError, match=r"^QuantizationSpec: is_dynamic=True with torch.float8.*allowed dynamic dtypes"):
        QuantizationSpec(dtype=dtype, observer_or_fake_quant_ctr=MinMaxObserver, is_dynamic=True)


@pytest.mark.parametrize("dtype", FLOAT8)
def test_qcore_observer_matches_torch_ao_on_float8(dtype):
    info = torch.finfo(dtype)
    x = torch.randn(200) * 3 + 0.5
    ours = MinMaxObserver(dtype=dtype, quant_min=int(info.min), quant_max=int(info.max))
    oracle = ao_observer.MinMaxObserver(dtype=dtype, quant_min=int(info.min), quant_max=int(info.max))
    ours(x)
    oracle(x)
    for a, b in zip(ours.calculate_qparams(), oracle.calculate_qparams()):
        assert torch.equal(a, b)
    assert MinMaxObserver(dtype=dtype).quant_max == int(info.max)  # default: the format's range
    per_channel = PerChannelMinMaxObserver(dtype=dtype, ch_axis=0, qscheme=torch.per_channel_symmetric)
    per_channel(torch.randn(4, 8))
    assert per_channel.calculate_qparams()[0].shape == (4,)


@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("dtype", FLOAT8)
@pytest.mark.parametrize("observer", (MinMaxObserver, ao_observer.MinMaxObserver), ids=("qcore", "torch_ao"))
def test_conv_with_float8_activations(dtype, model_dtype, observer):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)).to(model_dtype)
    x = torch.randn(1, 3, 5, 5, dtype=model_dtype)
    converted = _quantize(model, x, ConvFloat8Quantizer(float8_spec(dtype, observer)))
    # torchao's counts: input and output quantized; the int8 weight folded, three dequantizes
    assert_graph_ops(converted, {"quantize_per_tensor": 2, "dequantize_per_tensor": 3, "conv2d": 1})
    for node in converted.graph.nodes:
        if node.op == "call_function" and node.target is qd.dequantize_per_tensor.default:
            source = node.args[0]
            is_weight = source.op == "get_attr"
            assert node.args[5] == (torch.int8 if is_weight else dtype)
            assert node.kwargs.get("out_dtype", torch.float32) == model_dtype  # quantize input dtype
            if not is_weight:
                assert source.target is qd.quantize_per_tensor.default and source.args[5] == dtype
    out = converted(x)
    assert out.dtype == model_dtype
    expected = model(x).float()
    relative = 0.05 if dtype == torch.float8_e4m3fn else 0.15  # 3 mantissa bits, or 2
    assert (out.float() - expected).abs().max() < relative * expected.abs().max()


@pytest.mark.parametrize("model_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("dtype", FLOAT8)
def test_float8_round_trip_is_within_the_format_step(dtype, model_dtype):
    """quantize -> dequantize moves a value by at most half an integer step plus half the float8
    grid's spacing at the quantized value, both times the scale."""
    torch.manual_seed(1)
    x = (torch.randn(4096) * 2).to(model_dtype)
    observer = MinMaxObserver(dtype=dtype, quant_min=int(torch.finfo(dtype).min), quant_max=int(torch.finfo(dtype).max))
    observer(x)
    scale, zero_point = observer.calculate_qparams()
    scale_f, zp = float(scale), int(zero_point)
    args = (scale_f, zp, observer.quant_min, observer.quant_max, dtype)
    q = qd.quantize_per_tensor.default(x, *args)
    assert q.dtype == dtype
    dq = qd.dequantize_per_tensor.default(q, *args, out_dtype=model_dtype)
    assert dq.dtype == model_dtype
    bound = scale_f * (0.5 + _float8_ulp(q.float(), dtype) / 2)
    if model_dtype == torch.bfloat16:  # dequantize computes q - zero_point and the product in bfloat16
        bound = bound + (scale_f * (q.float() - zp).abs() + dq.float().abs()) * 2.0**-8
    assert bool(((dq.float() - x.float()).abs() <= bound * (1 + 1e-6)).all())
    # the largest value lands on the float8 grid's top: the format's step there, not an int step
    assert (dq.float() - x.float()).abs().max() > 0.5 * scale_f


def test_float8_has_no_histogram_search_and_no_fake_quant_kernel():
    with pytest.raises(TypeError, match=r"^HistogramObserver: dtype torch.float8_e4m3fn is not supported; allowed: "):
        HistogramObserver(dtype=torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"^FakeQuantize: dtype torch.float8_e5m2 cannot be fake-quantized: .*integer grids"):
        FakeQuantize(observer=MinMaxObserver, dtype=torch.float8_e5m2)
