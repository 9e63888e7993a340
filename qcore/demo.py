"""``qcore demo``: a small CNN trained on real data (scikit-learn's 8x8 digits), quantized and lowered.

Trains for a few seconds, quantizes with ``qcore.quantize`` for the onednn backend (xnnpack when
oneDNN is unavailable here), and prints float vs int8 accuracy on the held-out split, latency
and speedup, then writes the report (``report.md``, ``sqnr.png``). With ``qat=True``
(``qcore demo --qat``) it also fine-tunes a fake-quantized copy for :data:`QAT_EPOCHS` epochs
(``qcore.quantize(qat=True, qat_epochs=...)``), prints the QAT model's accuracy next to PTQ's,
and reports on the QAT model.

>>> from qcore.demo import DigitsCNN
>>> import torch
>>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

import torch

__all__ = ["DigitsCNN", "load_digits_split", "train", "accuracy", "run_digits_demo", "QAT_EPOCHS"]

#: Epochs of quantization-aware fine-tuning in ``qcore demo --qat`` (about half a second each).
QAT_EPOCHS = 2


class DigitsCNN(torch.nn.Module):
    """conv-relu, conv-relu, max-pool, linear-relu, linear: 8x8 grey images to 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> tuple:
    """(x_train, y_train, x_test, y_test): digits scaled to [0, 1], shape (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("qcore demo needs scikit-learn for its data set: pip install qcore[demo]") from None

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train_ = order[:n_test], order[n_test:]
    return images[train_], labels[train_], images[test], labels[test]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 8, seed: int = 0) -> torch.nn.Module:
    """A few epochs of Adam, batch 64; returns ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _pick_backend(choice: str) -> tuple[str, str]:
    """(backend, note): onednn if available, else xnnpack, for ``choice == "auto"``."""
    from qcore.plugin_manager import get_plugin_manager

    if choice != "auto":
        return choice, ""
    backends = get_plugin_manager().backends()
    if "onednn" in backends:
        return "onednn", ""
    if "xnnpack" in backends:
        everything = get_plugin_manager().backends(include_unavailable=True)
        why = everything["onednn"].is_available() if "onednn" in everything else "qcore-onednn-x86 is not installed"
        return "xnnpack", f" (onednn unavailable: {why})"
    raise RuntimeError("qcore demo needs the onednn or the xnnpack backend; install qcore[onednn] or qcore[xnnpack]")


def run_digits_demo(
    report_dir: Optional[str] = "qcore-report",
    backend: str = "auto",
    seed: int = 0,
    out: TextIO = sys.stdout,
    progress: Any = None,
    qat: bool = False,
) -> Any:
    """Train, quantize, lower, compare, report; returns the ``QuantizeResult`` (with ``qat``, the
    QAT one, after printing its accuracy next to PTQ's).

    Runs on one thread (restored afterwards): stable timings, and no thread oversubscription on
    a busy machine (two threads on a loaded 2-core machine train ten times slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_digits_demo(report_dir, backend, seed, out, progress, qat)
    finally:
        torch.set_num_threads(threads)


def _run_digits_demo(report_dir: Optional[str], backend: str, seed: int, out: TextIO, progress: Any, qat: bool) -> Any:
    import qcore
    from qcore.report import time_model

    backend, note = _pick_backend(backend)
    started = time.perf_counter()
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    out.write(f"data: scikit-learn digits, 8x8 images, {len(y_train)} train / {len(y_test)} held-out\n")
    model = train(DigitsCNN(), x_train, y_train, seed=seed)
    out.write(f"1. trained DigitsCNN (conv-conv-pool-fc-fc) in {time.perf_counter() - started:.1f} s\n")

    calibration = [(x_train[i : i + 64],) for i in range(0, 640, 64)]
    batch = torch.export.Dim("batch", min=1, max=4096)
    result = qcore.quantize(
        model, (x_train[:64],), backend=backend, calibration=calibration, dynamic_shapes=({0: batch},),
        progress=progress, measure_latency=False,
        lower=backend != "xnnpack",  # XNNPACK kernels run in ExecuTorch, not here: keep the q/dq program
    )
    quantized = result.model
    report = result.report
    n_int8 = sum(1 for node in report.nodes if node.quantized)
    if result.lowered is None:
        lowered_note = "kept as the q/dq program (its kernels run in the backend's runtime; here PyTorch runs reference ops)"
    else:
        lowered_note = "lowered to oneDNN kernels" if backend == "onednn" else f"lowered for {backend}"
    out.write(
        f"2. quantized with backend {backend}{note}: {n_int8} of {len(report.nodes)} compute nodes int8, "
        f"calibrated on {len(calibration)} batches, {lowered_note}\n"
    )

    float_accuracy, int8_accuracy = accuracy(model, x_test, y_test), accuracy(quantized, x_test, y_test)
    report.accuracy = {"float": float_accuracy, "quantized": int8_accuracy}
    out.write(f"3. held-out accuracy: float {float_accuracy:.2%}, int8 {int8_accuracy:.2%}\n")
    if qat:
        qat_started = time.perf_counter()
        labelled = [(x_train[i : i + 64], y_train[i : i + 64]) for i in range(0, len(y_train), 64)]
        result = qcore.quantize(
            model, (x_train[:64],), backend=backend, calibration=labelled, dynamic_shapes=({0: batch},),
            qat=True, qat_epochs=QAT_EPOCHS, progress=progress, measure_latency=False, lower=result.lowered is not None,
        )
        quantized, report = result.model, result.report
        qat_accuracy = accuracy(quantized, x_test, y_test)
        report.accuracy = {"float": float_accuracy, "quantized": qat_accuracy, "post-training quantization (no QAT)": int8_accuracy}
        out.write(
            f"   QAT: fine-tuned a fake-quantized copy ({report.training.describe()}) in "
            f"{time.perf_counter() - qat_started:.1f} s\n"
            f"   held-out accuracy after QAT: int8 {qat_accuracy:.2%} (PTQ {int8_accuracy:.2%}, float {float_accuracy:.2%})\n"
        )

    timing_batch = (x_test[:256],)
    report.latency_ms = {"float": time_model(model, timing_batch), "quantized": time_model(quantized, timing_batch)}
    out.write(
        f"4. latency (batch 256, 1 thread): float {report.latency_ms['float']:.3f} ms, int8 {report.latency_ms['quantized']:.3f} ms, "
        f"speedup {report.speedup:.2f}x\n"
    )
    if report.model_sqnr_db is not None:
        against = " (before QAT; training moved the weights)" if report.training is not None else ""
        measured = f", lowered (what runs); q/dq program {report.qdq_sqnr_db:.1f} dB" if report.lowered_sqnr_db is not None else ""
        out.write(f"   model output SQNR vs float{against}: {report.model_sqnr_db:.1f} dB{measured}\n")
    report.title = f"qcore demo: DigitsCNN on digits, backend {backend}" + (", quantization-aware training" if qat else "")
    if report_dir:
        from qcore.cli import write_report_atomically

        write_report_atomically(report, report_dir)
        out.write(f"5. report: {report_dir}/report.md, {report_dir}/sqnr.png\n")
    out.write(f"done in {time.perf_counter() - started:.1f} s\n")
    return result
