"""Real data: a small CNN on scikit-learn's 8x8 digits, float vs PTQ vs QAT.

The float model is trained eagerly; PTQ quantizes it after folding batch norm into the convs;
QAT exports it in training mode, fine-tunes it for a few epochs through
``prepare_qat_pt2e`` (conv-bn fused for training) and converts it (batch norm folded back).
``bench/bench_qat_digits.py`` prints the same three figures (and, optionally, the figures with
3-bit weights, where PTQ loses more and QAT wins some of it back).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Optional

import attrs
import pytest
import torch
from torch.fx import GraphModule

import qcore
from qcore.spec import QuantizationConfig

pytest.importorskip("sklearn")

from test_fuse_conv_bn_qat import ConvBnQuantizer, ptq_config, qat_config  # noqa: E402

BATCH = 64


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1347 / 450 images, scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:450], order[450:]
    return images[train], labels[train], images[test], labels[test]


class DigitsCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.relu2 = torch.nn.ReLU()
        self.conv3 = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(32)
        self.relu3 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


def _batches(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]  # full batches only


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, on_epoch: Optional[Callable[[int], None]] = None) -> None:
    """Adam on full batches of 64; ``on_epoch(i)`` runs before epoch ``i``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        for index in _batches(len(y), generator):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent correct, in batches of 64 (the last batch padded: exported graphs have a fixed batch)."""
    correct = 0
    for start in range(0, len(y), BATCH):
        xb = x[start : start + BATCH]
        n = len(xb)
        if n < BATCH:
            xb = torch.cat([xb, xb.new_zeros(BATCH - n, *xb.shape[1:])])
        correct += int((model(xb)[:n].argmax(1) == y[start : start + n]).sum())
    return 100.0 * correct / len(y)


def fold_batch_norm(model: DigitsCNN) -> torch.nn.Module:
    """The eval model with each batch norm folded into its conv (what PTQ quantizes)."""
    folded = copy.deepcopy(model).eval()
    for i in (1, 2, 3):
        conv, bn = getattr(folded, f"conv{i}"), getattr(folded, f"bn{i}")
        setattr(folded, f"conv{i}", torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn))
        setattr(folded, f"bn{i}", torch.nn.Identity())
    return folded


def with_weight_bits(config: QuantizationConfig, bits: int) -> QuantizationConfig:
    """``config`` with symmetric weights on ``bits`` bits (stored as int8: range ±(2**(bits-1) - 1))."""
    limit = 2 ** (bits - 1) - 1
    return attrs.evolve(config, weight=attrs.evolve(config.weight, quant_min=-limit, quant_max=limit))


def train_float(seed: int, data: tuple, epochs: int = 15) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    train(model.train(), data[0], data[1], epochs=epochs, lr=3e-3, seed=seed)
    return model.eval()


def ptq_accuracy(model: DigitsCNN, data: tuple, quantizer: Any) -> float:
    """PTQ of the batch-norm-folded model, calibrated on 512 training images."""
    x_train, _, x_test, y_test = data
    exported = torch.export.export(fold_batch_norm(model), (x_train[:BATCH],)).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    for first in range(0, 8 * BATCH, BATCH):
        prepared(x_train[first : first + BATCH])
    return accuracy(qcore.convert_pt2e(prepared), x_test, y_test)


def qat_accuracy(model: DigitsCNN, data: tuple, quantizer: Any, seed: int, epochs: int = 3, lr: float = 5e-4) -> tuple[float, GraphModule]:
    """QAT fine-tuning of the float model; the last epoch runs with quantizer ranges and
    batch-norm statistics frozen. Returns the converted model's accuracy and the model."""
    from qcore import observers

    x_train, y_train, x_test, y_test = data
    exported = torch.export.export(copy.deepcopy(model).train(), (x_train[:BATCH],)).module()
    prepared = qcore.prepare_qat_pt2e(exported, quantizer)

    def schedule(epoch: int) -> None:
        if epoch == epochs - 1:
            prepared.apply(observers.disable_observer)
            qcore.move_exported_model_to_eval(prepared)

    train(prepared, x_train, y_train, epochs=epochs, lr=lr, seed=seed + 1, on_epoch=schedule)
    qcore.move_exported_model_to_eval(prepared)
    converted = qcore.convert_pt2e(prepared)
    return accuracy(converted, x_test, y_test), converted


def run_digits_experiment(seed: int = 0, weight_bits: tuple[int, ...] = (8,), quantizers: Optional[dict] = None) -> dict[str, float]:
    """Train float once; PTQ and QAT at each weight width. Returns test accuracies (%) keyed
    ``float``, ``ptq_w8``, ``qat_w8``, ... and timings in seconds (``*_s``).

    ``quantizers``: optional ``{bits: (ptq_quantizer, qat_quantizer)}``; default the test-local
    conv-bn quantizer (8-bit activations, per-channel weights).
    """
    data = load_digits_split(seed)
    results: dict[str, float] = {}
    start = time.perf_counter()
    model = train_float(seed, data)
    results["float"] = accuracy(model, data[2], data[3])
    results["float_s"] = time.perf_counter() - start
    for bits in weight_bits:
        if quantizers and bits in quantizers:
            ptq_quantizer, qat_quantizer = quantizers[bits]
        else:
            ptq_quantizer = ConvBnQuantizer(with_weight_bits(ptq_config(), bits))
            qat_quantizer = ConvBnQuantizer(with_weight_bits(qat_config(), bits))
        start = time.perf_counter()
        results[f"ptq_w{bits}"] = ptq_accuracy(model, data, ptq_quantizer)
        results[f"ptq_w{bits}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        results[f"qat_w{bits}"], converted = qat_accuracy(model, data, qat_quantizer, seed)
        results[f"qat_w{bits}_s"] = time.perf_counter() - start
        results[f"qat_w{bits}_batch_norms"] = float(
            sum(1 for n in converted.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
        )
    return results


def test_qat_matches_or_beats_ptq_and_stays_near_float_on_digits():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic figures, and no thrashing on a busy machine
    try:
        start = time.perf_counter()
        results = run_digits_experiment(seed=0, weight_bits=(8,))
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    print(
        f"\ndigits test accuracy (450 images): float {results['float']:.2f}%"
        f"  PTQ {results['ptq_w8']:.2f}%  QAT {results['qat_w8']:.2f}%  ({elapsed:.1f}s)"
    )
    assert results["float"] >= 95.0, results
    assert results["qat_w8_batch_norms"] == 0
    assert results["qat_w8"] >= results["ptq_w8"], results
    assert results["qat_w8"] >= results["float"] - 1.0, results
    assert elapsed < 120.0
