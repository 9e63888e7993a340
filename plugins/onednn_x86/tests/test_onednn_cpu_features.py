"""The CPU probe (each answer forced), the config it chooses per target, that the probe predicts
what oneDNN's int8 kernels really do here, and the warning when a program made for one CPU is
lowered on another."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

import qcore
from qcore_onednn_x86 import X86InductorQuantizer, cpu_features, get_default_x86_inductor_quantization_config
from qcore.errors import QuantizeError
from qcore_onednn_x86.lowering.check_int8_exact_on_cpu import Int8SaturationWarning

from _onednn_helpers import assert_close_to_reference, counters, lower, quantize, x86_quantizer

AMX = {"cpu_name": "Intel Xeon (AMX)", "avx2": True, "avx512_vnni": True, "amx_tile": True, "amx_int8": True,
       "amx_bf16": True, "avx512_bf16": True}
AVX512_VNNI = {"cpu_name": "Intel Xeon (VNNI)", "avx2": True, "avx512_vnni": True}
AVX_VNNI = {"cpu_name": "Intel Core (AVX-VNNI)", "avx2": True, "avx_vnni": True}
AVX2 = {"cpu_name": "AMD EPYC", "avx2": True}


def force_probes(monkeypatch, flags: dict, capability: str, bf16: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)


@pytest.mark.parametrize(
    "flags, capability, bf16, kernel, saturates",
    [
        (AMX, "AVX512", True, "amx", False),
        (AVX512_VNNI, "AVX512", False, "avx512_vnni", False),
        (AVX_VNNI, "AVX2", False, "avx_vnni", False),
        (AVX2, "AVX2", False, "avx2", True),
        ({"cpu_name": "Intel Xeon (Skylake-X)", "avx2": True, "avx512_f": True}, "AVX512", False, "avx2", True),
    ],
    ids=["amx", "avx512_vnni", "avx_vnni", "avx2", "avx512-without-vnni"],
)
def test_probe_reads_torchs_answers(monkeypatch, flags, capability, bf16, kernel, saturates):
    force_probes(monkeypatch, flags, capability, bf16)
    cpu = cpu_features.detect_cpu()
    assert (cpu.int8_kernel, cpu.int8_pair_sums_saturate, cpu.native_bf16, cpu.capability) == (kernel, saturates, bf16, capability)
    assert cpu.name == flags["cpu_name"]
    line = cpu.describe()
    assert flags["cpu_name"] in line and capability in line and "\n" not in line
    assert ("pair sums saturate" in line) == saturates
    assert ("no native bf16" in line) == (not bf16)
    facts = cpu_features.hardware_facts()
    assert facts["target"] == kernel and facts["int8_pair_sums_saturate"] == saturates
    json.dumps(facts)  # JSON-ready for `qcore plugins --json`


def test_probe_of_this_cpu_agrees_with_torch():
    cpu = cpu_features.detect_cpu()
    capabilities = torch.cpu.get_capabilities()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.avx512_vnni == bool(capabilities.get("avx512_vnni")) == torch.cpu._is_vnni_supported()
    assert cpu.native_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_probe_predicts_what_onednn_int8_computes_here():
    """One u8 x s8 pair at the extremes: 2 * 255 * 127 = 64770 does not fit int16. Exact where
    the probe says so; saturated where it says the pair sums saturate."""
    x = torch.full((1, 64), 255, dtype=torch.uint8)
    w = torch.full((8, 64), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, [1, 64])
    zero_points = torch.zeros(8, dtype=torch.long)
    out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(8), zero_points, None, 1.0, 0,
                                             torch.float32, "none", [], "")
    exact = 64 * 255 * 127
    assert (out == exact).all().item() != cpu_features.detect_cpu().int8_pair_sums_saturate, out[0, 0].item()
    # the pair-safe ranges of the avx2 config are exact on every CPU
    safe = torch.ops.onednn.qlinear_pointwise(torch.full((1, 64), 180, dtype=torch.uint8), 1.0, 0,
                                              torch.ops.onednn.qlinear_prepack(torch.full((8, 64), -91, dtype=torch.int8), [1, 64]),
                                              torch.ones(8), zero_points, None, 1.0, 0, torch.float32, "none", [], "")
    assert (safe == 64 * 180 * -91).all()


def test_config_per_target():
    for target in ("amx", "avx512_vnni", "avx_vnni"):
        config = get_default_x86_inductor_quantization_config(target=target)
        assert (config.input_activation.quant_min, config.input_activation.quant_max) == (0, 255)
        assert (config.weight.quant_min, config.weight.quant_max) == (-128, 127)
    avx2 = get_default_x86_inductor_quantization_config(target="avx2")
    assert (avx2.input_activation.quant_max, avx2.output_activation.quant_max) == (180, 180)
    assert (avx2.weight.quant_min, avx2.weight.quant_max) == (-91, 91)
    assert cpu_features.pair_sum_is_exact(avx2.input_activation.quant_max, 91)
    reduced = get_default_x86_inductor_quantization_config(reduce_range=True, target="avx2")
    assert (reduced.input_activation.quant_max, reduced.weight.quant_min, reduced.weight.quant_max) == (127, -128, 127)
    qat = get_default_x86_inductor_quantization_config(is_qat=True, target="avx2")
    assert qat.is_qat and (qat.weight.quant_min, qat.weight.quant_max) == (-91, 91)
    assert X86InductorQuantizer.default_config(target="avx2") == avx2
    with pytest.raises(ValueError, match=r"unknown target CPU 'avx512': expected one of amx, avx512_vnni, avx_vnni, avx2"):
        get_default_x86_inductor_quantization_config(target="avx512")


@pytest.mark.parametrize("flags, weight_max", [(AVX2, 91), (AVX512_VNNI, 127)], ids=["avx2", "vnni"])
def test_default_config_follows_the_running_cpu(monkeypatch, flags, weight_max):
    force_probes(monkeypatch, flags, "AVX2", False)
    assert get_default_x86_inductor_quantization_config().weight.quant_max == weight_max
    assert X86InductorQuantizer.default_config().weight.quant_max == weight_max


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_this_cpus_default_lowers_exactly():
    """The default for this CPU: the lowered model is the q/dq program, within one output step."""
    example = (torch.randn(2, 8, 12, 12),)
    converted = quantize(ConvNet(), example)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8SaturationWarning)
        lowered = lower(converted, example)
    assert_close_to_reference(converted, lowered, example)


def test_program_for_a_vnni_cpu_lowered_on_avx2_warns_once_and_runs(monkeypatch):
    example = (torch.randn(2, 8, 12, 12),)
    converted = quantize(ConvNet(), example, x86_quantizer(get_default_x86_inductor_quantization_config(target="avx512_vnni")))
    monkeypatch.setattr(cpu_features, "detect_cpu", lambda: cpu_features.cpu_for_target("avx2"))
    with pytest.warns(Int8SaturationWarning) as caught:
        lowered = lower(converted, example)
    messages = [str(w.message) for w in caught if issubclass(w.category, Int8SaturationWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "a CPU with VNNI or AMX" in messages[0] and "AVX2 without VNNI" in messages[0]
    assert "2 of 2 int8 layers" in messages[0] and "[0, 255] x weights [-128, 127]" in messages[0]
    assert "target='avx2'" in messages[0]
    assert counters(lowered)["int8_layers_inexact_on_cpu"] == 2
    with torch.no_grad():
        assert lowered(*example).shape == (2, 10)


def test_program_for_avx2_lowered_anywhere_does_not_warn(monkeypatch):
    example = (torch.randn(2, 8, 12, 12),)
    converted = quantize(ConvNet(), example, x86_quantizer(get_default_x86_inductor_quantization_config(target="avx2")))
    for target in ("avx2", "avx512_vnni"):
        monkeypatch.setattr(cpu_features, "detect_cpu", lambda target=target: cpu_features.cpu_for_target(target))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Int8SaturationWarning)
            lower(converted, example)


def test_quantize_records_the_target_and_the_warning_names_it_after_load(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval()
    example = (torch.randn(2, 8, 12, 12),)
    result = qcore.quantize(model, example, backend="onednn", target="avx512_vnni", measure_latency=False, lower=False)
    assert result.converted.meta["qcore_target"] == "avx512_vnni"
    path = os.path.join(tmp_path, "model.pt2")
    result.save(path)
    loaded = qcore.load(path)
    assert loaded.meta["qcore_target"] == "avx512_vnni"
    monkeypatch.setattr(cpu_features, "detect_cpu", lambda: cpu_features.cpu_for_target("avx2"))
    with pytest.warns(Int8SaturationWarning, match=r"quantized for target 'avx512_vnni' .* this CPU is target avx2"):
        lowered = qcore.lower(loaded, backend="onednn", example_inputs=example)
    with torch.no_grad():
        assert lowered(*example).shape == (2, 10)


def test_quantize_records_this_cpus_target_by_default():
    result = qcore.quantize(ConvNet().eval(), (torch.randn(2, 8, 12, 12),), backend="onednn",
                            measure_latency=False, lower=False)
    assert result.converted.meta["qcore_target"] == cpu_features.detect_cpu().int8_kernel


def test_quantize_target_errors():
    example = (torch.randn(2, 8, 12, 12),)
    with pytest.raises(QuantizeError, match=r"unknown target CPU 'pentium'.*expected one of amx, avx512_vnni"):
        qcore.quantize(ConvNet().eval(), example, backend="onednn", target="pentium")
    with pytest.raises(QuantizeError, match=r"target='avx2' chooses the backend's default config"):
        qcore.quantize(ConvNet().eval(), example, backend="onednn", target="avx2",
                       config=get_default_x86_inductor_quantization_config(target="avx2"))


def test_narrow_output_quantizes_fuse_with_a_uint8_clamp_that_keeps_the_memory_format():
    """A program for a CPU without VNNI (any CPU runs it): every oneDNN op that writes a [0, 180]
    uint8 output is followed by qcore_onednn.clamp_uint8 (oneDNN saturates at 255 only), and the
    clamp keeps channels-last, so the next conv reads it as it is."""
    from torch.ops import qcore_onednn

    example = (torch.randn(2, 8, 12, 12),)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    converted = quantize(model, example, x86_quantizer(get_default_x86_inductor_quantization_config(target="avx2")))
    lowered = lower(converted, example)
    clamps = [n for n in lowered.graph.nodes if n.target is qcore_onednn.clamp_uint8.default]
    assert [n.args[1] for n in clamps] == [180] and clamps[0].args[0].target is torch.ops.onednn.qconv2d_pointwise.default
    x = torch.randint(0, 256, (2, 4, 5, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    clamped = qcore_onednn.clamp_uint8(x, 180)
    assert clamped.is_contiguous(memory_format=torch.channels_last) and torch.equal(clamped, x.clamp_max(180))
    assert_close_to_reference(converted, lowered, example)
