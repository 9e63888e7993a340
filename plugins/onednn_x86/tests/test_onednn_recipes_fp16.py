"""``get_x86_inductor_linear_dynamic_fp16_config()`` (torchao's name): linears whose weight is
stored in float16 and cast back to float32 at run time, beside a static int8 global config."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import qcore
from qcore.spec import get_weight_qspec
from qcore.testing.graph_ops import op_counts
from qcore_onednn_x86 import X86InductorQuantizer, get_x86_inductor_linear_dynamic_fp16_config

from _recipes_helpers import calls, config, convert, qdq_counts


class ConvThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4 * 4 * 4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


LINEAR_EXAMPLE = (torch.randn(2, 4, generator=torch.Generator().manual_seed(0)),)
CONV_EXAMPLE = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)),)


def fp16_linears(q, c):
    return q.set_global(c).set_module_type_qconfig(nn.Linear, get_x86_inductor_linear_dynamic_fp16_config())


def torchao_fp16_linears(q, c):
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    return q.set_global(c).set_module_type_qconfig(nn.Linear, ao_x86.get_x86_inductor_linear_dynamic_fp16_config())


def test_the_config_is_torchaos():
    fp16 = get_x86_inductor_linear_dynamic_fp16_config()
    assert fp16 is get_x86_inductor_linear_dynamic_fp16_config()  # cached, as torchao's
    assert (fp16.input_activation, fp16.output_activation, fp16.bias, fp16.is_qat) == (None, None, None, False)
    assert fp16.weight.dtype is torch.float16 and fp16.weight.qscheme is None and not fp16.weight.is_dynamic
    assert get_weight_qspec(fp16) is fp16.weight  # a cast needs no qscheme
    int8 = qcore.QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=qcore.observers.MinMaxObserver)
    with pytest.raises(ValueError, match="qscheme None is not supported for weights"):
        get_weight_qspec(qcore.QuantizationConfig(weight=int8))  # an integer weight still needs one


def test_it_mixes_with_a_static_global_config_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantizer = fp16_linears(X86InductorQuantizer(), config())
    assert quantizer.operator_type_config[torch.ops.aten.linear.default] is get_x86_inductor_linear_dynamic_fp16_config()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_weight_is_a_float16_round_trip(bias):
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=bias).eval()
    prepared = qcore.prepare_pt2e(torch.export.export(model, LINEAR_EXAMPLE).module(), fp16_linears(X86InductorQuantizer(), config()))
    # one observer, the weight's float16 placeholder: no activation is observed
    observers = [(type(m).__name__, m.dtype) for name, m in prepared.named_modules() if name.startswith("activation_post_process")]
    assert observers == [("PlaceholderObserver", torch.float16)]
    prepared(*LINEAR_EXAMPLE)
    converted = qcore.convert_pt2e(prepared)
    counts = op_counts(converted)
    assert counts.get("_to_copy") == 2 and qdq_counts(converted) == dict.fromkeys(qdq_counts(converted), 0)
    (linear,) = calls(converted, "linear")
    to_float, to_half = linear.args[1], linear.args[1].args[0]
    assert to_float.kwargs["dtype"] is torch.float32 and to_half.kwargs["dtype"] is torch.float16
    assert to_half.args[0].op == "get_attr"
    assert linear.args[0].op == "placeholder"  # the activation stays float32
    with torch.no_grad():
        expected = nn.functional.linear(LINEAR_EXAMPLE[0], model.weight.half().float(), model.bias)
        assert torch.equal(converted(*LINEAR_EXAMPLE), expected)


def test_beside_int8_convs_the_linear_input_is_quantized_for_flatten_only():
    """conv -> relu -> flatten -> fp16 linear: flatten runs on uint8 (its user is a quantizable
    op), as in torchao; the linear reads the dequantized flatten and its fp16 weight."""
    torch.manual_seed(0)
    converted = convert(ConvThenLinear(), CONV_EXAMPLE, fp16_linears(X86InductorQuantizer(), config()))
    assert qdq_counts(converted) == {"quantize_per_tensor": 3, "dequantize_per_tensor": 3, "dequantize_per_channel": 1, "choose_qparams": 0}
    assert op_counts(converted)["_to_copy"] == 2


@pytest.mark.torchao
@pytest.mark.parametrize("case", ["linear", "linear without bias", "conv then linear"])
def test_fp16_linears_match_torchao(case):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import quantize_pt2e as ao
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    model, example = {
        "linear": (nn.Linear(4, 4), LINEAR_EXAMPLE),
        "linear without bias": (nn.Linear(4, 4, bias=False), LINEAR_EXAMPLE),
        "conv then linear": (ConvThenLinear(), CONV_EXAMPLE),
    }[case]
    torch.manual_seed(0)
    mine = convert(model, example, fp16_linears(X86InductorQuantizer(), config()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = convert(model, example, torchao_fp16_linears(ao_x86.X86InductorQuantizer(), ao_x86.get_default_x86_inductor_quantization_config()), peer=ao)
    assert qdq_counts(mine) == qdq_counts(theirs)
    # torchao casts with its own quantized_decomposed.convert_element_type.no_fuse, qcore with aten._to_copy
    assert op_counts(mine)["_to_copy"] == op_counts(theirs)["convert_element_type"] == 2
    with torch.no_grad():
        assert torch.allclose(mine(*example), theirs(*example), atol=1e-6)


def test_lowered_fp16_linear_keeps_the_cast_and_matches():
    torch.manual_seed(0)
    for model, example in ((nn.Linear(4, 4), LINEAR_EXAMPLE), (ConvThenLinear(), CONV_EXAMPLE)):
        quantizer = X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()).set_module_type_qconfig(
            nn.Linear, get_x86_inductor_linear_dynamic_fp16_config()
        )
        converted = convert(model, example, quantizer)
        lowered = qcore.lower(converted, backend="onednn", example_inputs=example)
        assert op_counts(lowered)["_to_copy"] == 2 and len(calls(lowered, "linear")) == 1  # no int8 kernel for it
        with torch.no_grad():
            assert torch.equal(converted(*example), lowered(*example))
