"""``qcore quantize``, ``qcore explain`` and the digits ``qcore demo``: outputs, and one-line errors that leave nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from qcore.app.cli import main
from qcore.testing import requires_backend

USER_MODULE = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    def make_model():
        torch.manual_seed(0)
        return Net().eval()

    def make_branchy():
        return Branchy()

    def broken_factory():
        raise RuntimeError("weights file not found")

    def batches():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)]

    def labelled_batches():
        return [(x, torch.zeros(4, dtype=torch.long)) for x in batches()]

    def wrong_batches():
        return [torch.randn(4, 1, 8, 8), torch.randn(4, 3, 8, 8)]

    LOADER_CALLS = []

    def labelled_generator():
        LOADER_CALLS.append(1)
        return ((x, torch.randint(0, 10, (4,))) for x in batches())
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "qcore_cli_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("qcore_cli_user_models", None)
    yield "qcore_cli_user_models"
    sys.modules.pop("qcore_cli_user_models", None)


def written_files(directory) -> list[str]:
    """What is in ``directory``, without Python's own bytecode cache of the user's module
    (written on import unless PYTHONDONTWRITEBYTECODE is set)."""
    return sorted(name for name in os.listdir(directory) if name != "__pycache__")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@requires_backend("onednn")
def test_quantize_writes_program_and_report(capsys, user_module, tmp_path):
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:batches",
        "--out", "model.pt2", "--report", "rep",
    )
    assert code == 0, err
    assert re.search(r"quantized for onednn: 3 of 4 compute nodes run on int8 inputs", out)
    assert "wrote model.pt2 and rep/report.md" in out
    assert err == ""  # no progress bars when stdout is not a terminal
    assert (tmp_path / "model.pt2").is_file()
    assert (tmp_path / "rep" / "sqnr.png").read_bytes().startswith(b"\x89PNG")
    markdown = (tmp_path / "rep" / "report.md").read_text()
    assert "| conv2d | aten.conv2d | int8 |" in markdown and "onednn.qconv2d_pointwise" in markdown
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temporaries left

    import qcore
    import torch

    loaded = qcore.load(tmp_path / "model.pt2")
    assert loaded(torch.randn(4, 1, 8, 8)).shape == (4, 10)


@requires_backend("onednn")
def test_quantize_file_path_spec_labels_and_dynamic_batch(capsys, user_module, tmp_path):
    code, out, err = run_cli(
        capsys, "quantize", str(tmp_path / "qcore_cli_user_models.py") + ":make_model",
        "--calibration", f"{user_module}:labelled_batches", "--calibration-has-labels", "--dynamic-batch",
        "--out", "m.pt2",
    )
    assert code == 0, err
    import qcore
    import torch

    loaded = qcore.load(tmp_path / "m.pt2")
    assert loaded.meta["qcore_backend"] == "onednn"
    assert loaded(torch.randn(7, 1, 8, 8)).shape == (7, 10)


@requires_backend("onednn")
def test_quantize_for_another_target_cpu_records_it(capsys, user_module, tmp_path):
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:batches",
        "--target-cpu", "avx2", "--out", "m.pt2",
    )
    assert code == 0, err
    assert "quantized for onednn (target avx2): " in out
    import qcore

    loaded = qcore.load(tmp_path / "m.pt2")
    assert loaded.meta["qcore_target"] == "avx2"
    weight_ranges = {tuple(n.args[4:6]) for n in loaded.graph.nodes if "dequantize_per_channel" in str(n.target)}
    assert weight_ranges == {(-91, 91)}  # the pair-safe x86 weights, whatever this CPU is


@requires_backend("onednn")
def test_explain_lists_integer_kernels_and_float_ops(capsys, user_module):
    code, out, err = run_cli(capsys, "explain", f"{user_module}:make_model", "--calibration", f"{user_module}:batches")
    assert code == 0, err
    assert "integer kernels: " in out and "onednn.qconv2d_pointwise x1" in out
    assert "relu (aten.relu): float: fused into the int8 partition of conv2d" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{m}:make_model", "--backend", "tpu"], r"unknown backend 'tpu'; installed backends: .*onednn"),
        (["no_such_pkg.models:make", ], r"model factory: cannot import module 'no_such_pkg.models'"),
        (["missing_dir/models.py:make"], r"model factory: file missing_dir/models.py does not exist"),
        (["{m}:nope"], r"model factory: module qcore_cli_user_models has no attribute 'nope'"),
        (["{m}:broken_factory"], r"model factory: qcore_cli_user_models:broken_factory\(\) raised RuntimeError: weights file not found"),
        (["{m}:make_branchy", "--calibration", "{m}:batches"], r"torch.export could not capture Branchy: .*at qcore_cli_user_models.py:\d+ in forward: if x.sum\(\) > 0:.*hint:"),
        (["{m}:make_model", "--calibration", "{m}:wrong_batches"], r"calibration batch 1, input 0: expected shape \(4, 1, 8, 8\) .*got \(4, 3, 8, 8\)"),
        (["{m}:make_model", "--calibration", "{m}:batches", "--out", "no/such/dir/model.pt2"], r"--out no/such/dir/model.pt2: directory .* does not exist"),
        (["{m}:make_model", "--calibration", "{m}:batches", "--out", "."], r"--out \. is a directory"),
        (["{m}:make_model"], r"no example inputs: give --calibration"),
        (["{m}:make_model", "--calibration", "{m}:batches", "--target-cpu", "z80"],
         r"backend 'onednn': unknown target CPU 'z80': expected one of amx, avx512_vnni, avx_vnni, avx2"),
    ],
)
@requires_backend("onednn")
def test_errors_are_one_line_nonzero_and_leave_nothing(capsys, user_module, tmp_path, argv, message):
    argv = [a.format(m=user_module) for a in argv]
    if "--out" not in argv:
        argv += ["--out", "model.pt2"]
    before = written_files(tmp_path)
    code, out, err = run_cli(capsys, "quantize", *argv, "--report", "rep")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("qcore: error: "), err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert written_files(tmp_path) == before


def test_unwritable_report_dir_leaves_no_model(capsys, user_module, tmp_path):
    (tmp_path / "rep").write_text("a file, not a directory")
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:batches",
        "--out", "model.pt2", "--report", "rep",
    )
    assert code == 1 and "--report rep exists and is not a directory" in err
    assert not (tmp_path / "model.pt2").exists()


@requires_backend("onednn")
def test_demo_on_digits_in_a_real_process(tmp_path):
    """What README command 1 runs: train on digits, quantize, lower, compare, write the report."""
    done = subprocess.run(
        [sys.executable, "-m", "qcore.app.cli", "demo", "--report", str(tmp_path / "report")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    accuracy = re.search(r"held-out accuracy: float ([\d.]+)%, int8 ([\d.]+)%", out)
    assert accuracy, out
    float_accuracy, int8_accuracy = map(float, accuracy.groups())
    assert float_accuracy > 85 and abs(float_accuracy - int8_accuracy) < 3
    assert re.search(r"latency \(batch 256, 1 thread\): float [\d.]+ ms, int8 [\d.]+ ms, speedup [\d.]+x", out)
    assert "backend onednn" in out or "backend xnnpack" in out
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| accuracy |" in markdown and "| conv2d | aten.conv2d | int8 |" in markdown
    assert (tmp_path / "report" / "sqnr.png").read_bytes().startswith(b"\x89PNG")
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- --qat
@requires_backend("onednn")
def test_quantize_qat_trains_on_labelled_batches_and_says_so(capsys, user_module, tmp_path):
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:labelled_batches",
        "--qat", "--qat-epochs", "2", "--qat-lr", "1e-3", "--out", "model.pt2", "--report", "rep",
    )
    assert code == 0, err
    assert re.search(
        r"quantization-aware training: built-in loop: 2 epochs of 3 batches, Adam lr 0.001, loss cross_entropy per epoch [\d.]+ -> [\d.]+", out
    ), out
    assert "quantized for onednn: 3 of 4 compute nodes run on int8 inputs" in out
    assert "Quantization-aware training: built-in loop: 2 epochs" in (tmp_path / "rep" / "report.md").read_text()
    import qcore
    import torch

    assert qcore.load(tmp_path / "model.pt2")(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_quantize_qat_rereads_a_generator_loader_each_epoch(capsys, user_module, tmp_path):
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:labelled_generator",
        "--qat", "--qat-epochs", "3", "--qat-loss", "cross_entropy", "--out", "model.pt2",
    )
    assert code == 0, err
    assert "3 epochs of 3 batches, Adam lr 0.0001" in out
    assert len(sys.modules[user_module].LOADER_CALLS) == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--qat-epochs", "2"], r"qcore quantize: error: --qat-epochs configures quantization-aware training: add --qat"),
        (["--qat-lr", "0.1", "--qat-loss", "mse"], r"--qat-lr, --qat-loss configure quantization-aware training: add --qat"),
        (["--qat", "--qat-epochs", "0"], r"argument --qat-epochs: expected a positive integer, got 0"),
        (["--qat", "--qat-lr", "-1"], r"argument --qat-lr: expected a positive number, got -1"),
        (["--qat", "--qat-lr", "nan"], r"argument --qat-lr: expected a positive number, got nan"),
        (["--qat", "--qat-loss", "hinge"], r"argument --qat-loss: invalid choice: 'hinge' \(choose from '?cross_entropy'?, '?mse'?\)"),
    ],
)
def test_bad_qat_flags_are_usage_errors(capsys, user_module, tmp_path, argv, message):
    before = written_files(tmp_path)
    code, out, err = run_cli(
        capsys, "quantize", f"{user_module}:make_model", "--calibration", f"{user_module}:labelled_batches", "--out", "model.pt2", *argv
    )
    assert code == 2
    assert re.search(message, err), err
    assert written_files(tmp_path) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--qat"], r"--qat trains on the calibration batches: give --calibration PKG.MODULE:LOADER yielding \(inputs..., target\)"),
        (["--qat", "--calibration", "{m}:batches"], r"--qat trains on the calibration batches, so each must be \(inputs..., target\); qcore_cli_user_models:batches\(\) gave a Tensor"),
        pytest.param(
            ["--qat", "--calibration", "{m}:labelled_batches", "--qat-loss", "mse"],
            r"loss_fn mse_loss\(output, \*targets\) failed on QAT batch 0: .*target\(s\) int64 \(4,\)",
            marks=pytest.mark.filterwarnings("ignore:Using a target size:UserWarning"),
        ),
    ],
)
def test_qat_without_targets_is_a_one_line_error_that_leaves_nothing(capsys, user_module, tmp_path, argv, message):
    argv = [a.format(m=user_module) for a in argv]
    before = written_files(tmp_path)
    code, out, err = run_cli(capsys, "quantize", f"{user_module}:make_model", *argv, "--out", "model.pt2", "--report", "rep")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("qcore: error: "), err
    assert re.search(message, err), err
    assert written_files(tmp_path) == before


def test_quantize_help_documents_qat(capsys):
    code, out, err = run_cli(capsys, "quantize", "--help")
    assert code == 0
    for flag in ("--qat ", "--qat-epochs N", "--qat-lr X", "--qat-loss"):
        assert flag in out
    assert "(inputs..., target)" in " ".join(out.split())


def test_demo_qat_prints_qat_next_to_ptq_and_reports_it(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--qat", "--report", str(tmp_path / "report"))
    assert code == 0, err
    ptq = re.search(r"held-out accuracy: float ([\d.]+)%, int8 ([\d.]+)%", out)
    qat = re.search(r"held-out accuracy after QAT: int8 ([\d.]+)% \(PTQ ([\d.]+)%, float ([\d.]+)%\)", out)
    assert ptq and qat, out
    assert qat.group(2) == ptq.group(2) and qat.group(3) == ptq.group(1)
    assert float(qat.group(1)) >= float(ptq.group(2)) - 1.0  # fine-tuning keeps int8 accuracy (here it gains a little)
    assert re.search(r"QAT: fine-tuned a fake-quantized copy \(built-in loop: 2 epochs of 22 batches", out)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Quantization-aware training: built-in loop: 2 epochs" in markdown
    assert "| accuracy, post-training quantization (no QAT) | - |" in markdown
    assert (tmp_path / "report" / "sqnr.png").read_bytes().startswith(b"\x89PNG")
