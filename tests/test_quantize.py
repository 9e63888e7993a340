"""``qcore.quantize`` / ``save`` / ``load``: the one-call flow, its errors, atomic saving, dynamic batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qcore
from qcore.testing import requires_backend
from qcore.metrics import sqnr_db
from qcore.errors import UnknownBackendError
from qcore.errors import CalibrationShapeError, ExportFailedError, QuantizeError


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return self.fc(x)
        return x


def batches(n: int = 4, batch: int = 4) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 8, 8, generator=generator),) for _ in range(n)]


@pytest.fixture(scope="module")
def cnn_result():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    return model, qcore.quantize(model, batches(1)[0], backend="onednn", calibration=batches(), measure_latency=False)


@requires_backend("onednn")
def test_quantize_onednn_lowers_to_integer_kernels(cnn_result):
    model, result = cnn_result
    x = batches(1)[0]
    kinds = {k.op: k.kind for k in result.report.kernels}
    assert kinds["onednn.qconv2d_pointwise"] == "integer kernel"
    assert kinds["onednn.qlinear_pointwise"] == "integer kernel"
    with torch.no_grad():
        assert sqnr_db(model(*x), result.lowered(*x)) > 20
        assert sqnr_db(result.converted(*x), result.lowered(*x)) > 30
    quantized = {n.name for n in result.report.nodes if n.quantized}
    assert {"conv2d", "linear", "max_pool2d"} <= quantized
    relu = next(n for n in result.report.nodes if n.name == "relu")
    assert not relu.quantized and "fused into the int8 partition of conv2d" in relu.reason
    assert all(n.sqnr_db is not None and n.sqnr_db > 15 for n in result.report.nodes if n.quantized)
    assert result.report.model_sqnr_db > 20


def test_quantize_does_not_change_the_model():
    model = SmallCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcore.quantize(model, batches(1)[0], calibration=batches(2), measure_latency=False, backend="reference")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@requires_backend("xnnpack")
def test_quantize_xnnpack_uses_its_per_channel_default_config():
    model = SmallCNN().eval()
    result = qcore.quantize(model, batches(1)[0], backend="xnnpack", calibration=batches(2), measure_latency=False, lower=False)
    targets = [str(n.target) for n in result.converted.graph.nodes]
    assert "quantized_decomposed.dequantize_per_channel.default" in targets
    assert result.lowered is None and result.model is result.converted


@requires_backend("onednn")
def test_quantize_qat_runs_and_converts():
    model = SmallCNN()
    labelled = [(x, torch.randint(0, 10, (4,))) for (x,) in batches(2)]
    result = qcore.quantize(model, batches(1)[0], backend="onednn", calibration=labelled, qat=True, qat_epochs=1, measure_latency=False)
    assert result.lowered(*batches(1)[0]).shape == (4, 10)
    assert result.report.training.epochs == 1 and len(result.report.training.epoch_losses) == 1


@requires_backend("onednn")
def test_unknown_backend_lists_installed():
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'tpu'; installed backends: .*onednn.*xnnpack"):
        qcore.quantize(SmallCNN(), batches(1)[0], backend="tpu")


def test_wrong_calibration_shape_names_expected_and_got():
    wrong = [(torch.randn(4, 1, 8, 8),), (torch.randn(4, 64),)]
    with pytest.raises(CalibrationShapeError, match=r"batch 1, input 0: expected shape \(4, 1, 8, 8\) .*got \(4, 64\)"):
        qcore.quantize(SmallCNN().eval(), batches(1)[0], calibration=wrong, backend="reference")


def test_wrong_batch_size_suggests_dynamic_shapes():
    with pytest.raises(CalibrationShapeError, match="got \\(2, 1, 8, 8\\); make the batch dimension dynamic"):
        qcore.quantize(SmallCNN().eval(), batches(1)[0], calibration=batches(1, batch=2), backend="reference")


def test_calibration_batches_may_carry_labels():
    labelled = [(x, torch.zeros(4, dtype=torch.long)) for (x,) in batches(2)]
    result = qcore.quantize(SmallCNN().eval(), batches(1)[0], calibration=labelled, measure_latency=False, backend="reference")
    assert any(n.quantized for n in result.report.nodes)


def test_export_failure_explains_error_line_and_hint():
    with pytest.raises(ExportFailedError) as info:
        qcore.quantize(Branchy(), (torch.randn(2, 4),), backend="reference")
    message = str(info.value)
    assert message.startswith("torch.export could not capture Branchy: ")
    assert "test_quantize.py" in message and "x.sum() > 0" in message
    assert "hint:" in message and "torch.cond" in message


@requires_backend("onednn")
def test_save_load_roundtrip_in_a_new_process(cnn_result, tmp_path):
    _, result = cnn_result
    path = tmp_path / "model.pt2"
    result.save(path)
    assert os.listdir(tmp_path) == ["model.pt2"]
    x = batches(1)[0][0]
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(result.lowered(x), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, qcore
        converted = qcore.load({str(path)!r})
        assert converted.meta["qcore_backend"] == "onednn"
        x = torch.load({str(tmp_path / 'x.pt')!r})
        lowered = qcore.lower(converted, backend="onednn", example_inputs=(x,))
        with torch.no_grad():
            assert torch.equal(lowered(x), torch.load({str(tmp_path / 'expected.pt')!r})), "outputs differ"
        print("identical")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "identical" in done.stdout


@requires_backend("onednn")
def test_save_to_unwritable_path_is_a_clear_error_and_leaves_nothing(cnn_result, tmp_path):
    _, result = cnn_result
    with pytest.raises(QuantizeError, match="cannot write .*does not exist"):
        result.save(tmp_path / "missing" / "model.pt2")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            with pytest.raises(QuantizeError, match="cannot write"):
                result.save(tmp_path / "x.pt2" / "model.pt2")
        else:
            with pytest.raises(QuantizeError, match="cannot write"):
                result.save(locked / "model.pt2")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)


@requires_backend("onednn")
def test_save_failure_midway_leaves_no_file(cnn_result, tmp_path, monkeypatch):
    _, result = cnn_result

    def fail(*args, **kwargs):
        with open(args[1], "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", fail)
    with pytest.raises(QuantizeError, match="No space left"):
        result.save(tmp_path / "model.pt2")
    assert os.listdir(tmp_path) == []


@requires_backend("onednn")
def test_dynamic_batch_through_quantize_save_load_and_lower(tmp_path):
    batch = torch.export.Dim("batch", min=1, max=256)
    model = SmallCNN().eval()
    calibration = [(torch.randn(n, 1, 8, 8),) for n in (3, 5, 8)]
    result = qcore.quantize(model, batches(1)[0], calibration=calibration, dynamic_shapes=({0: batch},), measure_latency=False, backend="onednn")
    for n in (1, 7):
        x = torch.randn(n, 1, 8, 8)
        assert result.lowered(x).shape == (n, 10)
    result.save(tmp_path / "dyn.pt2")
    loaded = qcore.load(tmp_path / "dyn.pt2")
    lowered = qcore.lower(loaded, backend="onednn", example_inputs=batches(1)[0])
    for n in (1, 7):
        x = torch.randn(n, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(lowered(x), result.lowered(x))


def test_load_missing_file(tmp_path):
    with pytest.raises(QuantizeError, match="cannot load .*no such file"):
        qcore.load(tmp_path / "nope.pt2")


@requires_backend("onednn")
@requires_backend("xnnpack")
def test_readme_one_call_quickstart_runs(tmp_path, monkeypatch, capsys):
    from pathlib import Path
    import re as regex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = regex.findall(r"```python\n(.*?)```", readme, flags=regex.S)
    one_call = next(block for block in blocks if "qcore.quantize(" in block)
    monkeypatch.chdir(tmp_path)
    exec(compile(one_call, "README.md one-call quickstart", "exec"), {})
    out = capsys.readouterr().out
    (kernels,) = [line for line in out.splitlines() if line.strip().startswith("integer kernels: ")]
    # both linears on oneDNN (a CPU without VNNI adds the uint8 clamp of their [0, 180] quantize)
    assert "onednn.qlinear_pointwise x2" in kernels.split(": ", 1)[1].split(", ")
    assert (tmp_path / "model.pt2").is_file() and (tmp_path / "report" / "sqnr.png").is_file()


@requires_backend("onednn")
def test_saved_program_holds_int8_weights_not_the_float_ones(cnn_result, tmp_path):
    _, result = cnn_result
    before = {name for name, _ in result.converted.named_parameters()}
    result.save(tmp_path / "model.pt2")
    loaded = qcore.load(tmp_path / "model.pt2")
    state = {name: t for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers())}
    assert "conv_weight_quantized" in state and state["conv_weight_quantized"].dtype == torch.int8
    assert "conv.weight" not in state and "fc.weight" not in state
    assert not [name for name in state if name.startswith("activation_post_process")]
    assert {name for name, _ in result.converted.named_parameters()} == before  # the result is not changed


@requires_backend("onednn")
def test_progress_wraps_export_calibration_and_lowering():
    stages = []

    def progress(iterable, desc):
        stages.append(desc)
        return iterable

    qcore.quantize(SmallCNN().eval(), batches(1)[0], calibration=batches(2), progress=progress, measure_latency=False, backend="onednn")
    assert stages == ["export", "calibrate", "lower"]
