"""``qcore demo``: a small CNN trained on real data (scikit-learn's 8x8 digits), quantized and lowered.

Trains for a few seconds, quantizes with ``qcore.quantize`` for the installed backend that
prefers to run here (``Backend.preference``: with both plugins, onednn; xnnpack when oneDNN is
unavailable; the built-in ``reference`` backend when no plugin is installed), and prints float vs int8 accuracy on the held-out split, latency
and speedup, then writes the report (``report.md``, ``sqnr.png``). With ``qat=True``
(``qcore demo --qat``) it also fine-tunes a fake-quantized copy for :data:`QAT_EPOCHS` epochs
(``qcore.quantize(qat=True, qat_epochs=...)``), prints the QAT model's accuracy next to PTQ's,
and reports on the QAT model.

The MLP walkthrough (``qcore demo --quantizer Q``) shows the four pt2e verbs one at a time.

>>> from qcore.app.demo import DigitsCNN
>>> import torch
>>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

import torch

__all__ = ["DigitsCNN", "load_digits_split", "train", "accuracy", "run_digits_demo", "run_mlp_walkthrough", "pick_backend", "QAT_EPOCHS"]

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


def pick_backend(choice: str) -> tuple[str, str]:
    """(backend, note) for ``choice``: a backend name as given, or for ``"auto"`` the available
    backend with the highest ``Backend.preference`` (the note says which preferred ones are not
    available here, and why).

    >>> pick_backend("reference")
    ('reference', '')
    """
    from qcore.plugin_manager import get_plugin_manager

    if choice != "auto":
        return choice, ""
    manager = get_plugin_manager()
    ranked = sorted(manager.backends(include_unavailable=True).values(), key=lambda b: (-b.preference, b.name))
    skipped: list[str] = []
    for backend in ranked:
        reason = backend.is_available()
        if reason is None:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            return backend.name, note
        skipped.append(f"{backend.name} unavailable: {reason}")
    raise RuntimeError("no backend is available here; see `qcore plugins`")


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
    from qcore.app.report import time_model
    from qcore.plugin_manager import get_plugin_manager

    backend, note = pick_backend(backend)
    record = get_plugin_manager().get_backend(backend)
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
        lower=record.lowered_runs_in_process,  # e.g. XNNPACK kernels run in ExecuTorch: keep the q/dq program
    )
    quantized = result.model
    report = result.report
    n_int8 = sum(1 for node in report.nodes if node.quantized)
    if result.lowered is None:
        lowered_note = "kept as the q/dq program (its kernels run in the backend's runtime; here PyTorch runs reference ops)"
    else:
        lowered_note = f"lowered to {record.kernel_library} kernels" if record.kernel_library else f"lowered for {backend}"
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
        from qcore.app.files import write_report_atomically

        write_report_atomically(report, report_dir)
        out.write(f"5. report: {report_dir}/report.md, {report_dir}/sqnr.png\n")
    out.write(f"done in {time.perf_counter() - started:.1f} s\n")
    return result


# --------------------------------------------------------------------------- the MLP walkthrough
def walkthrough_quantizer(choice: str) -> tuple[Any, str]:
    """(quantizer, a sentence naming it) for ``qcore demo --quantizer``: ``toy`` (built into
    qcore), a backend name (its quantizer with ``default_config()``), or ``auto`` (the backend
    :func:`pick_backend` picks)."""
    if choice == "toy":
        from qcore.testing.toy import ToyLinearQuantizer

        return ToyLinearQuantizer(), "ToyLinearQuantizer (built into qcore)"
    from qcore.plugin_manager import get_plugin_manager

    name, note = pick_backend(choice)
    record = get_plugin_manager().get_backend(name)
    quantizer_class = record.quantizer_class
    # default_config is duck-typed: Backend.quantizer_class is any class
    quantizer = quantizer_class().set_global(getattr(quantizer_class, "default_config")())
    return quantizer, f"{quantizer_class.__name__} ({record.distribution}, backend {name}), its default config{note}"


def _count_qdq(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name.startswith("quantized_decomposed."):
            op = name.split(".")[1]
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def run_mlp_walkthrough(quantizer_choice: str = "auto", batches: int = 8, seed: int = 0, out: TextIO = sys.stdout) -> None:
    """The step-by-step MLP walkthrough: export, prepare_pt2e, calibrate, convert_pt2e, run.

    >>> import io
    >>> run_mlp_walkthrough("toy", batches=2, out=io.StringIO())
    """
    import qcore
    from qcore.metrics import sqnr_db

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).eval()
    example_inputs = (torch.randn(4, 16),)
    quantizer, quantizer_name = walkthrough_quantizer(quantizer_choice)

    out.write("model: MLP Linear(16,32) ReLU Linear(32,32) ReLU Linear(32,8)\n")
    out.write(f"quantizer: {quantizer_name}\n")
    exported = torch.export.export(model, example_inputs).module()
    out.write("1. exported with torch.export\n")
    prepared = qcore.prepare_pt2e(exported, quantizer)
    observers = sum(1 for node in prepared.graph.nodes if node.op == "call_module")
    out.write(f"2. prepare_pt2e: {observers} observers inserted\n")
    with torch.no_grad():
        for _ in range(batches):
            prepared(torch.randn(4, 16))
    out.write(f"3. calibrated on {batches} random batches\n")
    converted = qcore.convert_pt2e(prepared)
    counts = _count_qdq(converted)
    summary = ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none"
    out.write(f"4. convert_pt2e: {summary}\n")
    test_batches = [torch.randn(4, 16) for _ in range(16)]  # the exported graph has batch size 4
    with torch.no_grad():
        reference = torch.cat([model(x) for x in test_batches])
        quantized = torch.cat([converted(x) for x in test_batches])
    out.write(f"5. ran on {len(test_batches) * 4} new samples: SQNR vs float = {sqnr_db(reference, quantized):.1f} dB\n")
