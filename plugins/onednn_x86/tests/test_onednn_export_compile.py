"""Saving the converted program, lowering after loading, torch.compile, and the torchao peer."""

from __future__ import annotations

import io

import pytest
import torch


from qcore_onednn_x86 import get_default_x86_inductor_quantization_config

from _onednn_helpers import assert_close_to_reference, count, lower, onednn, qd, quantize, x86_quantizer


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y) + y * 1.0)
        y = torch.nn.functional.max_pool2d(y, 2)
        y = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return self.fc(y)


EXAMPLE = (torch.randn(2, 3, 16, 16),)


def test_converted_program_round_trips_through_export_save_load_and_then_lowers():
    converted = quantize(SmallNet(), EXAMPLE)
    program = torch.export.export(converted, EXAMPLE)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    assert count(loaded, qd.quantize_per_tensor.default) == count(converted, qd.quantize_per_tensor.default)
    with torch.no_grad():
        assert torch.allclose(loaded(*EXAMPLE), converted(*EXAMPLE), atol=1e-6)
    lowered = lower(loaded, EXAMPLE)
    assert count(lowered, onednn.qconv2d_pointwise.default, torch.ops.qcore_onednn.qconv2d_add.default) == 2
    assert count(lowered, onednn.qlinear_pointwise.default) == 1
    assert_close_to_reference(converted, lowered, EXAMPLE)


@pytest.mark.slow
def test_lowered_model_compiles_with_torch_compile():
    torch._dynamo.reset()
    converted = quantize(SmallNet(), EXAMPLE)
    lowered = lower(converted, EXAMPLE)
    # oneDNN's packed weights must be graph constants for Inductor: compile with freezing
    compiled = torch.compile(lowered)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        expected = lowered(*EXAMPLE)
        actual = compiled(*EXAMPLE)
    assert (expected - actual).abs().max() < 1e-4
    torch._dynamo.reset()


@pytest.mark.torchao
# the VNNI recipe lowered on a CPU without VNNI warns that it saturates (test_onednn_cpu_features tests the warning)
@pytest.mark.filterwarnings("ignore::qcore_onednn_x86.lowering.check_int8_exact_on_cpu.Int8SaturationWarning")
def test_matches_torchaos_x86_lowering_on_a_linear_relu_linear():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    example = (torch.randn(4, 16),)
    peer = prepare_pt2e(torch.export.export(model, example).module(),
                        xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config()))
    peer(*example)
    peer_lowered = lower_pt2e_quantized_to_x86(convert_pt2e(peer), example)
    # the peer's recipe (full 8-bit, for a VNNI CPU): the same program, the same kernels, any CPU
    same_recipe = x86_quantizer(get_default_x86_inductor_quantization_config(target="avx512_vnni"))
    ours_same = lower(quantize(model, example, same_recipe, batches=0), example)
    # qcore's default for this CPU: exact here
    ours = lower(quantize(model, example, batches=0), example)
    assert count(ours, onednn.qlinear_pointwise.default) == count(peer_lowered, onednn.qlinear_pointwise.default) == 2
    assert count(ours_same, onednn.qlinear_pointwise.default) == 2
    with torch.no_grad():
        reference = model(*example)
        ours_out, ours_same_out, peer_out = ours(*example), ours_same(*example), peer_lowered(*example)
    scale = reference.abs().max()
    assert (ours_out - reference).abs().max() < 0.05 * scale
    assert (ours_same_out - peer_out).abs().max() < 0.05 * scale
