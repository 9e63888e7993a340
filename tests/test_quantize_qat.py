"""Quantization-aware training through ``qcore.quantize(qat=True)``: the built-in loop on real
data (scikit-learn digits), the user's ``train_fn``, the report, the user's model left alone,
and every bad combination of options as a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import qcore
from qcore.testing import requires_backend
from qcore.app.qat_training import QATError

pytest.importorskip("sklearn")

from qcore.app.demo import accuracy, load_digits_split, train  # noqa: E402

BATCH = 64


class BnDigitsCNN(torch.nn.Module):
    """conv-bn-relu, max-pool, conv-relu, linear: batch norm makes "the user's model is not changed" meaningful."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic figures, no oversubscription on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(one_thread):
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def undertrained(digits):
    """A float model after one epoch: room for QAT to improve it, and a clear signal that it did."""
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    return train(BnDigitsCNN(), x_train, y_train, epochs=1, seed=0)


def labelled_batches(digits) -> list:
    x_train, y_train, _, _ = digits
    return [(x_train[i : i + BATCH], y_train[i : i + BATCH]) for i in range(0, len(y_train), BATCH)]


def dynamic_batch() -> tuple:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


@pytest.fixture(scope="module")
def ptq_and_qat(digits, undertrained):
    x_train, _, _, _ = digits
    state_before = copy.deepcopy(undertrained.state_dict())
    ptq = qcore.quantize(
        undertrained, (x_train[:BATCH],), calibration=[(x,) for x, _ in labelled_batches(digits)[:8]],
        dynamic_shapes=dynamic_batch(), measure_latency=False, backend="onednn"
    )
    qat = qcore.quantize(
        undertrained, (x_train[:BATCH],), calibration=labelled_batches(digits), qat=True, qat_epochs=3, qat_lr=2e-3,
        dynamic_shapes=dynamic_batch(), measure_latency=False, backend="onednn"
    )
    return ptq, qat, state_before


@requires_backend("onednn")
def test_builtin_qat_lowers_the_loss_and_beats_ptq(digits, undertrained, ptq_and_qat):
    _, _, x_test, y_test = digits
    ptq, qat, _ = ptq_and_qat
    training = qat.report.training
    assert training.method == "built-in loop" and training.epochs == 3 and training.lr == 2e-3
    assert training.loss_fn == "cross_entropy" and training.batches_per_epoch == len(labelled_batches(digits)) == 22
    losses = training.epoch_losses
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0], losses
    assert training.final_loss == losses[-1]
    float_accuracy = accuracy(undertrained, x_test, y_test)
    ptq_accuracy, qat_accuracy = accuracy(ptq.model, x_test, y_test), accuracy(qat.model, x_test, y_test)
    print(f"\nundertrained digits CNN: float {float_accuracy:.2%}, PTQ {ptq_accuracy:.2%}, QAT {qat_accuracy:.2%}")
    # QAT trained the weights: the int8 model is well above the float model it started from
    assert qat_accuracy >= ptq_accuracy + 0.04 and qat_accuracy >= float_accuracy + 0.04
    assert qat_accuracy >= 0.9
    kinds = {k.op: k.kind for k in qat.report.kernels}
    assert kinds["onednn.qconv2d_pointwise"] == "integer kernel"  # converted and lowered as PTQ is
    assert not [n for n in qat.converted.graph.nodes if "batch_norm" in str(n.target)]  # folded back into the conv


@requires_backend("onednn")
def test_qat_trains_a_copy_and_leaves_the_model_alone(undertrained, ptq_and_qat):
    _, _, state_before = ptq_and_qat
    state_after = undertrained.state_dict()
    assert state_after.keys() == state_before.keys()
    for name, value in state_before.items():  # weights and batch-norm statistics (num_batches_tracked too)
        assert torch.equal(value, state_after[name]), name
    assert not undertrained.training and not any(m.training for m in undertrained.modules())


@requires_backend("onednn")
def test_report_says_qat_was_used(ptq_and_qat, tmp_path):
    ptq, qat, _ = ptq_and_qat
    assert ptq.report.training is None and "Quantization-aware" not in ptq.report.to_markdown()
    markdown = qat.report.to_markdown()
    assert "Quantization-aware training: built-in loop: 3 epochs of 22 batches, Adam lr 0.002, loss cross_entropy" in markdown
    assert f"(final {qat.report.training.final_loss:.4f})" in markdown
    assert "last epoch with ranges and batch norm frozen" in markdown
    assert "quantization-aware training: built-in loop" in qat.report.explain()
    qat.report.write(tmp_path)
    assert "Quantization-aware training" in (tmp_path / "report.md").read_text()


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


X = (torch.randn(8, 8, generator=torch.Generator().manual_seed(0)),)


def small_batches(n: int = 3) -> list:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator)) for _ in range(n)]


def test_train_fn_gets_the_prepared_copy_in_train_mode_and_its_training_is_kept():
    torch.manual_seed(0)
    model = Small().eval()
    calls = []

    def shrink_outputs(prepared):
        """Train the outputs towards zero: the converted model must show it."""
        calls.append((prepared, prepared.training, torch.is_grad_enabled()))
        assert isinstance(prepared, torch.fx.GraphModule) and prepared is not model
        assert any(isinstance(m, qcore.observers.FakeQuantize) for m in prepared.modules())
        optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
        for _ in range(30):
            optimizer.zero_grad()
            prepared(*X).pow(2).mean().backward()
            optimizer.step()

    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # the caller's no_grad does not reach the training loop
        result = qcore.quantize(model, X, qat=True, train_fn=shrink_outputs, measure_latency=False, backend="reference")
        ptq = qcore.quantize(model, X, measure_latency=False, backend="reference")
    assert len(calls) == 1
    _, training_mode, grad_enabled = calls[0]
    assert training_mode and grad_enabled
    with torch.no_grad():
        trained, untrained = result.model(*X).pow(2).mean(), ptq.model(*X).pow(2).mean()
    assert trained < 0.2 * untrained, (trained, untrained)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.report.training.method == "train_fn"
    assert "shrink_outputs" in result.report.training.train_fn
    assert "your train_fn" in result.report.to_markdown()


def test_train_fn_that_returns_another_module_is_an_error():
    with pytest.raises(QATError, match="train_fn .*returned a Sequential: it must train the module it is given in place and return None"):
        qcore.quantize(Small(), X, qat=True, train_fn=lambda prepared: torch.nn.Sequential(), measure_latency=False, backend="reference")


@requires_backend("onednn")
def test_progress_names_each_qat_epoch():
    stages = []

    def progress(iterable, desc):
        stages.append(desc)
        return iterable

    qcore.quantize(Small(), X, qat=True, qat_epochs=2, calibration=small_batches(), progress=progress, measure_latency=False, backend="onednn")
    assert stages == ["export", "QAT epoch 1/2", "QAT epoch 2/2", "lower"]


def test_one_epoch_over_a_generator_and_custom_loss():
    seen = []

    def loss_fn(output, target):
        seen.append(target.shape)
        return torch.nn.functional.mse_loss(output, target)

    generator = ((x, torch.randn(8, 4)) for x, _ in small_batches())
    result = qcore.quantize(Small(), X, qat=True, qat_epochs=1, loss_fn=loss_fn, calibration=generator, measure_latency=False, backend="reference")
    assert seen == [torch.Size([8, 4])] * 3
    assert result.report.training.loss_fn.endswith("loss_fn") and result.report.training.lr == qcore.app.qat_training.DEFAULT_QAT_LR
    assert not result.report.training.frozen_last_epoch


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(qat_epochs=2), r"^qat_epochs given but qat=False: it configures quantization-aware training; pass qat=True"),
        (dict(train_fn=print, qat_lr=0.1), r"^train_fn, qat_lr given but qat=False: they configure"),
        (dict(qat=True), r"qat=True fine-tunes a fake-quantized copy .* pass train_fn=<callable\(prepared_module\)> .* or qat_epochs=<positive int>"),
        (dict(qat=True, qat_epochs=1, train_fn=print), r"pass train_fn or qat_epochs, not both"),
        (dict(qat=True, train_fn="train.py"), r"train_fn must be a callable taking the prepared module, got str"),
        (dict(qat=True, train_fn=print, loss_fn=print), r"loss_fn configures the built-in loop \(qat_epochs\); with train_fn"),
        (dict(qat=True, train_fn=print, calibration=[X]), r"with train_fn, calibration batches are not used.*pass calibration=None"),
        (dict(qat=True, qat_epochs=0), r"qat_epochs must be a positive int \(passes over the calibration batches\), got 0"),
        (dict(qat=True, qat_epochs=-2), r"qat_epochs must be a positive int .*got -2"),
        (dict(qat=True, qat_epochs=1.5), r"qat_epochs must be a positive int .*got 1.5"),
        (dict(qat=True, qat_epochs=True), r"qat_epochs must be a positive int .*got True"),
        (dict(qat=True, qat_epochs=1, qat_lr=0), r"qat_lr must be a positive finite number \(Adam's learning rate\), got 0"),
        (dict(qat=True, qat_epochs=1, qat_lr=float("nan")), r"qat_lr must be a positive finite number .*got nan"),
        (dict(qat=True, qat_epochs=1, qat_lr="1e-3"), r"qat_lr must be a positive finite number .*got '1e-3'"),
        (dict(qat=True, qat_epochs=1, loss_fn="mse"), r"loss_fn must be a callable loss_fn\(output, \*targets\)"),
        (dict(qat=True, qat_epochs=1), r"qat_epochs=1 trains on the calibration batches, but calibration is None"),
        (dict(qat=True, qat_epochs=2, calibration=iter(small_batches())), r"qat_epochs=2 goes over calibration 2 times, but calibration is a one-shot iterator \(list_iterator\)"),
    ],
)
def test_bad_qat_options_are_clear_errors(options, message):
    with pytest.raises(QATError, match=message):
        qcore.quantize(Small(), X, backend="reference", measure_latency=False, **options)


def test_qat_must_be_a_bool():
    with pytest.raises(TypeError, match="qat must be True or False, got 'yes'"):
        qcore.quantize(Small(), X, qat="yes", backend="reference")


@pytest.mark.parametrize(
    "calibration, message",
    [
        ([X, X], r"QAT batch 0: the built-in loop needs the model's 1 input\(s\) followed by the target\(s\) for loss_fn, e.g. \(x, y\); got a tuple of 1 item\(s\)"),
        ([X[0]], r"QAT batch 0: .*got a Tensor"),
        ([], r"calibration gave no batches in QAT epoch 1"),
    ],
)
def test_batches_without_targets_are_an_error(calibration, message):
    with pytest.raises(QATError, match=message):
        qcore.quantize(Small(), X, qat=True, qat_epochs=1, calibration=calibration, measure_latency=False, backend="reference")


def test_wrong_shape_in_a_qat_batch_names_the_batch():
    from qcore.errors import CalibrationShapeError

    bad = small_batches(2) + [(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(CalibrationShapeError, match=r"calibration batch 2, input 0: expected shape \(8, 8\)"):
        qcore.quantize(Small(), X, qat=True, qat_epochs=1, calibration=bad, measure_latency=False, backend="reference")


def test_diverging_or_non_scalar_loss_is_an_error():
    with pytest.raises(QATError, match=r"QAT loss is nan at epoch 1, batch 0: training diverged; lower qat_lr \(now 0.0001\)"):
        qcore.quantize(Small(), X, qat=True, qat_epochs=1, calibration=small_batches(), loss_fn=lambda out, y: out.sum() * float("nan"), measure_latency=False, backend="reference")
    per_sample = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    with pytest.raises(QATError, match=r"loss_fn <lambda> must return a scalar tensor, got a tensor of shape \(8,\)"):
        qcore.quantize(Small(), X, qat=True, qat_epochs=1, calibration=small_batches(), loss_fn=per_sample, measure_latency=False, backend="reference")


def test_a_reiterable_is_read_once_per_epoch():
    class Epochs:
        """A re-iterable like a DataLoader: counts how often it is started."""

        def __init__(self) -> None:
            self.started = 0

        def __iter__(self):
            self.started += 1
            return iter(small_batches())

    data = Epochs()
    result = qcore.quantize(Small(), X, qat=True, qat_epochs=3, calibration=data, measure_latency=False, backend="reference")
    assert data.started == 3 and result.report.training.batches_per_epoch == 3


@requires_backend("onednn")
def test_readme_qat_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(block for block in blocks if "qat_epochs=" in block)
    namespace: dict = {}
    exec(compile(example, "README.md QAT example", "exec"), namespace)
    losses = capsys.readouterr().out.strip()
    assert re.fullmatch(r"\(([\d.]+, ){2}[\d.]+\)", losses), losses
    assert namespace["result"].report.training.method == "train_fn"


@requires_backend("onednn")
def test_report_lists_compute_nodes_not_batch_norm_bookkeeping(ptq_and_qat):
    _, qat, _ = ptq_and_qat
    names = [n.name for n in qat.report.nodes]
    assert "add_" not in names and "batch_norm" in names
    assert next(n for n in qat.report.nodes if n.name == "batch_norm").reason.startswith("folded away by convert")


def test_targets_the_loss_cannot_use_are_an_error_naming_the_shapes():
    wrong = [(x, torch.randn(8, 3)) for x, _ in small_batches()]  # cross-entropy wants 4 classes or class indices
    with pytest.raises(QATError, match=r"loss_fn cross_entropy\(output, \*targets\) failed on QAT batch 0: RuntimeError: .*\(output float32 \(8, 4\), target\(s\) float32 \(8, 3\)\)"):
        qcore.quantize(Small(), X, qat=True, qat_epochs=1, calibration=wrong, measure_latency=False, backend="reference")
