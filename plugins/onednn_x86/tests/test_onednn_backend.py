"""The oneDNN backend as a plugin: registration, availability, cheap import, conformance."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qcore
from qcore.errors import BackendUnavailableError
from qcore.plugin_manager import get_plugin_manager
from qcore.testing.conformance import BackendConformance

from _onednn_helpers import lower, quantize

from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config


class TestOneDNNConformance(BackendConformance):
    backend = "onednn"


def test_backend_record_names_the_quantizer_and_is_available():
    backend = get_plugin_manager().get_backend("onednn")
    assert backend.quantizer_class is X86InductorQuantizer
    assert backend.distribution == "qcore-onednn-x86"
    assert backend.is_available() is None


def test_lowering_passes_are_registered_in_dependency_order():
    names = [p.name for p in get_plugin_manager().lowering_passes("onednn")]
    assert names[:3] == ["check_int8_exact_on_cpu", "lift_quantize_over_views", "promote_dequantize"]
    assert names.index("prepack_conv_weights") < names.index("fuse_unary_post_ops") < names.index("fuse_binary_post_ops")
    assert names.index("fuse_binary_post_ops") < names.index("lower_quantized_max_pool2d")
    assert get_plugin_manager().lowering_passes("xnnpack") == [] or all(
        p.plugin != "onednn" for p in get_plugin_manager().lowering_passes("xnnpack")
    )


def test_config_values_match_the_x86_recipe():
    config = get_default_x86_inductor_quantization_config(target="avx512_vnni")  # the recipe's own values
    act, weight = config.input_activation, config.weight
    assert (act.dtype, act.quant_min, act.quant_max, act.qscheme) == (torch.uint8, 0, 255, torch.per_tensor_affine)
    assert (weight.dtype, weight.quant_min, weight.quant_max, weight.qscheme, weight.ch_axis) == (
        torch.int8, -128, 127, torch.per_channel_symmetric, 0)
    assert config.bias is None
    assert get_default_x86_inductor_quantization_config(is_dynamic=True).input_activation.is_dynamic
    assert get_default_x86_inductor_quantization_config(is_qat=True).is_qat
    assert get_default_x86_inductor_quantization_config(reduce_range=True).input_activation.quant_max == 127
    with pytest.raises(TypeError, match="is_qat must be True or False"):
        get_default_x86_inductor_quantization_config(is_qat="yes")


def test_import_is_cheap():
    code = (
        "import sys, qcore_onednn_x86; "
        "bad = [m for m in ('torch._inductor', 'torchao', 'qcore_onednn_x86.lowering.prepack_conv_weights') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_unavailable_onednn_declines_with_a_clear_message_and_qdq_model_still_runs(monkeypatch):
    example = (torch.randn(1, 3, 8, 8),)
    converted = quantize(TinyConvNet(), example)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="oneDNN"):
        qcore.lower(converted, backend="onednn", example_inputs=example)
    assert "onednn" not in get_plugin_manager().backends()
    # the passes themselves decline too (a caller that runs them directly)
    from qcore.records import LoweringContext
    from qcore_onednn_x86.lowering.prepack_conv_weights import prepack_conv_weights
    from qcore_onednn_x86.lowering.graph_utils import OneDNNUnavailableWarning

    with pytest.warns(OneDNNUnavailableWarning, match="no oneDNN"):
        assert prepack_conv_weights(converted, LoweringContext(backend="onednn")) is False
    assert converted(*example).shape == (1, 8, 6, 6)


def test_lowering_never_mutates_the_converted_model():
    example = (torch.randn(1, 3, 8, 8),)
    converted = quantize(TinyConvNet(), example)
    before = [str(n.target) for n in converted.graph.nodes]
    lower(converted, example)
    assert [str(n.target) for n in converted.graph.nodes] == before


def test_lowering_works_without_inductors_quantization_passes():
    """qcore's passes are its own: block torch._inductor's x86 quantization module and lower."""
    code = r'''
import sys
sys.modules["torch._inductor.fx_passes.quantization"] = None
sys.modules["torch._inductor.freezing"] = None
import torch, qcore
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
ex = (torch.randn(2, 3, 8, 8),)
p = qcore.prepare_pt2e(torch.export.export(m, ex).module(), X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()))
p(*ex)
c = qcore.convert_pt2e(p)
low = qcore.lower(c, backend="onednn", example_inputs=ex)
n = sum(1 for x in low.graph.nodes if x.op == "call_function" and str(x.target).startswith("onednn."))
assert n == 2, low.graph
print("ok", n, (low(*ex) - c(*ex)).abs().max().item())
'''
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok 2" in result.stdout
