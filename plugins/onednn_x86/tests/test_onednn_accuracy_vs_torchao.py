"""Accuracy against the peer on a small ResNet-style CNN (the bench CNN's structure: 7x7 stem
conv, relu, max_pool2d, residual blocks, adaptive_avg_pool2d, flatten, linear), with the same
calibration data.

Written with functional relus (as the bench model is), torchao's source-partition matcher
does not see the relus as fused post-ops, so it leaves the max_pool2d and the average pool
float; with ``nn.ReLU`` modules it makes both share their input's observer. qcore matches the
relus either way, so its default recipe (torchao's int8-in-int8-out) quantizes both pools in
both models: the program torchao gives the ``nn.ReLU`` model, with its SQNR. qcore's
``sharing_recipe="sqnr"`` quantizes the max_pool2d input with the qparams of the pool's own
output observer and leaves average pools float: equal SQNR to torchao in the first case, better
in the second.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import qcore
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
from qcore_onednn_x86.cpu_features import detect_cpu

from _onednn_helpers import x86_quantizer

pytestmark = pytest.mark.torchao


class FunctionalRelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class Block(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, relu: type) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = torch.nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu1, self.relu2 = relu(), relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.down(x) if self.down is not None else x
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + identity)


class SmallResNet(torch.nn.Module):
    def __init__(self, relu: type) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 7, 2, 3)
        self.relu = relu()
        self.layers = torch.nn.Sequential(Block(16, 16, 1, relu), Block(16, 32, 2, relu), Block(32, 32, 1, relu))
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu(self.stem(x)), 3, 2, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(x), 1), 1))


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - actual).pow(2).mean()))


def _converted_outputs(model, example, calibration, flow, lowered=False, recipe="torchao"):
    exported = torch.export.export(copy.deepcopy(model), example).module()
    if flow == "qcore":
        # the recipe torchao's default is (full 8-bit: target a VNNI CPU), whatever this CPU is
        quantizer = X86InductorQuantizer(sharing_recipe=recipe).set_global(get_default_x86_inductor_quantization_config(target="avx512_vnni"))
        prepared = qcore.prepare_pt2e(exported, quantizer)
    else:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    if flow == "qcore":
        converted = qcore.convert_pt2e(prepared)
    else:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        converted = convert_pt2e(prepared)
    if lowered and flow == "qcore":
        converted = qcore.lower(converted, backend="onednn", example_inputs=example)
    elif lowered:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        converted = lower_pt2e_quantized_to_x86(converted, example)
    with torch.no_grad():
        return converted(*example)


def _small_resnet_case(relu: type) -> tuple:
    """(model, example, calibration batches, float output on the example), seeded."""
    torch.manual_seed(0)
    model = SmallResNet(relu).eval()
    example = (torch.randn(8, 3, 64, 64),)
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(3)] + [example[0]]
    with torch.no_grad():
        return model, example, calibration, model(*example)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("relu, margin_db", [(FunctionalRelu, 0.0), (torch.nn.ReLU, 0.5)])
def test_small_resnet_sqnr_recipe_at_least_torchaos(relu, margin_db):
    pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    model, example, calibration, reference = _small_resnet_case(relu)
    ours = sqnr(reference, _converted_outputs(model, example, calibration, "qcore", recipe="sqnr"))
    peers = sqnr(reference, _converted_outputs(model, example, calibration, "torchao"))
    assert ours > 30.0
    # functional relus: the same quantization, up to float rounding (0.0 dB apart when measured);
    # nn.ReLU modules: torchao requantizes the average on the input's grid (1.4 dB lost here)
    assert ours >= peers + margin_db - 0.05, (ours, peers)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_small_resnet_default_recipe_is_torchaos_program():
    """The default recipe gives the nn.ReLU model torchao's program (the same SQNR), and the
    functional-relu model the same program (qcore sees those relus as post-ops too)."""
    pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    model, example, calibration, reference = _small_resnet_case(torch.nn.ReLU)
    ours = sqnr(reference, _converted_outputs(model, example, calibration, "qcore"))
    peers = sqnr(reference, _converted_outputs(model, example, calibration, "torchao"))
    assert ours > 30.0
    assert abs(ours - peers) <= 0.05, (ours, peers)
    functional, f_example, f_calibration, f_reference = _small_resnet_case(FunctionalRelu)
    ours_functional = sqnr(f_reference, _converted_outputs(functional, f_example, f_calibration, "qcore"))
    assert abs(ours_functional - ours) <= 0.05, (ours_functional, ours)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_small_resnet_lowered_on_this_cpu_is_exact_and_at_least_torchaos():
    """What the user runs: qcore's default for this CPU, lowered, against torchao's default,
    lowered. With VNNI both are the same 8-bit program; without, torchao's saturates in
    oneDNN's int16 pair sums and qcore's ([0, 180] x [-91, 91]) does not."""
    pytest.importorskip("torchao.quantization.pt2e.lowering")
    model, example, calibration, reference = _small_resnet_case(FunctionalRelu)
    exported = torch.export.export(copy.deepcopy(model), example).module()
    prepared = qcore.prepare_pt2e(exported, x86_quantizer())  # this CPU's default
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    converted = qcore.convert_pt2e(prepared)
    lowered = qcore.lower(converted, backend="onednn", example_inputs=example)
    with torch.no_grad():
        ours_qdq, ours_lowered = sqnr(reference, converted(*example)), sqnr(reference, lowered(*example))
    peers_qdq = sqnr(reference, _converted_outputs(model, example, calibration, "torchao"))
    peers_lowered = sqnr(reference, _converted_outputs(model, example, calibration, "torchao", lowered=True))
    assert ours_lowered >= ours_qdq - 0.5, (ours_lowered, ours_qdq)
    assert ours_qdq >= peers_qdq - 6.0, (ours_qdq, peers_qdq)
    assert ours_lowered >= peers_lowered - 0.5, (ours_lowered, peers_lowered)
    if detect_cpu().int8_pair_sums_saturate:  # the peer's program loses accuracy here, silently
        assert peers_lowered < peers_qdq - 3.0, (peers_lowered, peers_qdq)
