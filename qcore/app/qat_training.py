"""Quantization-aware training inside ``qcore.quantize(qat=True)``: checking the options, running
the user's ``train_fn`` or the built-in loop on the fake-quantized copy of the model.

Two ways to train (exactly one of them with ``qat=True``):

* ``train_fn=fn``: ``fn(prepared)`` runs your own training loop on the QAT-prepared module
  (a copy of your model with fake-quantizers, in train mode) and returns None.
* ``qat_epochs=N``: the built-in loop, ``N`` passes over ``calibration``, whose batches are the
  model's inputs followed by the target(s): ``(x, y)``. Adam with ``qat_lr`` (default
  :data:`DEFAULT_QAT_LR`), loss ``loss_fn(output, *targets)`` (default cross-entropy). When
  ``N >= 2`` the last epoch runs with the quantization ranges frozen and the module in eval mode
  (batch norm on its running statistics, dropout off).

>>> check_qat_options(qat=False, train_fn=None, qat_epochs=3, qat_lr=None, loss_fn=None, calibration=None)
Traceback (most recent call last):
...
qcore.app.qat_training.QATError: qat_epochs given but qat=False: it configures quantization-aware training; pass qat=True (or drop it for post-training quantization)
"""

from __future__ import annotations

import collections.abc
import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch.fx import GraphModule

from qcore.errors import QcoreError
from qcore.app.report import TrainingSummary

__all__ = ["QATError", "DEFAULT_QAT_LR", "check_qat_options", "run_train_fn", "run_builtin_loop"]

#: Adam's learning rate for the built-in loop: small, as QAT fine-tunes an already trained model.
DEFAULT_QAT_LR = 1e-4


class QATError(QcoreError, ValueError):
    """Quantization-aware training options or data that cannot work (the message says why)."""


def _describe(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _shape_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    return type(value).__name__


def check_qat_options(
    qat: Any,
    train_fn: Optional[Callable],
    qat_epochs: Any,
    qat_lr: Any,
    loss_fn: Optional[Callable],
    calibration: Optional[Iterable],
) -> None:
    """Raise :class:`QATError` (or ``TypeError`` for ``qat`` itself) for a combination that cannot work."""
    if not isinstance(qat, bool):
        raise TypeError(f"qat must be True or False, got {qat!r}")
    given = [name for name, value in (("train_fn", train_fn), ("qat_epochs", qat_epochs), ("qat_lr", qat_lr), ("loss_fn", loss_fn)) if value is not None]
    if not qat:
        if given:
            them = "it configures" if len(given) == 1 else "they configure"
            raise QATError(
                f"{', '.join(given)} given but qat=False: {them} quantization-aware training; "
                f"pass qat=True (or drop {'it' if len(given) == 1 else 'them'} for post-training quantization)"
            )
        return
    if train_fn is None and qat_epochs is None:
        raise QATError(
            "qat=True fine-tunes a fake-quantized copy of the model, so it needs a training loop: pass "
            "train_fn=<callable(prepared_module)> to run yours, or qat_epochs=<positive int> for the built-in "
            "loop over calibration batches of (inputs..., target)"
        )
    if train_fn is not None and qat_epochs is not None:
        raise QATError("pass train_fn or qat_epochs, not both: train_fn runs your own training loop, qat_epochs the built-in one")
    if train_fn is not None:
        if not callable(train_fn):
            raise QATError(f"train_fn must be a callable taking the prepared module, got {type(train_fn).__name__}")
        extra = [name for name in ("qat_lr", "loss_fn") if name in given]
        if extra:
            raise QATError(
                f"{' and '.join(extra)} configure{'s' if len(extra) == 1 else ''} the built-in loop (qat_epochs); "
                f"with train_fn your own loop chooses its optimizer and loss"
            )
        if calibration is not None:
            raise QATError(
                "with train_fn, calibration batches are not used: your train_fn is the training loop and the "
                "fake-quantizers observe what it runs; pass calibration=None"
            )
        return
    if isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or qat_epochs < 1:
        raise QATError(f"qat_epochs must be a positive int (passes over the calibration batches), got {qat_epochs!r}")
    if qat_lr is not None and (
        isinstance(qat_lr, bool) or not isinstance(qat_lr, (int, float)) or not math.isfinite(qat_lr) or qat_lr <= 0
    ):
        raise QATError(f"qat_lr must be a positive finite number (Adam's learning rate), got {qat_lr!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise QATError(f"loss_fn must be a callable loss_fn(output, *targets) -> scalar tensor, got {type(loss_fn).__name__}")
    if calibration is None:
        raise QATError(
            f"qat_epochs={qat_epochs} trains on the calibration batches, but calibration is None: pass "
            f"calibration=[(inputs..., target), ...] (a list, or a DataLoader yielding (x, y))"
        )
    if qat_epochs > 1 and isinstance(calibration, collections.abc.Iterator):  # checked without starting it
        raise QATError(
            f"qat_epochs={qat_epochs} goes over calibration {qat_epochs} times, but calibration is a one-shot "
            f"iterator ({type(calibration).__name__}): pass a list or a DataLoader, or qat_epochs=1"
        )


def run_train_fn(prepared: GraphModule, train_fn: Callable[[GraphModule], object]) -> TrainingSummary:
    """Call ``train_fn(prepared)`` with ``prepared`` in train mode (and gradients on)."""
    import qcore

    qcore.move_exported_model_to_train(prepared)
    with torch.enable_grad():
        returned = train_fn(prepared)
    if returned is not None and returned is not prepared:
        raise QATError(
            f"train_fn {_describe(train_fn)} returned a {type(returned).__name__}: it must train the module it is "
            f"given in place and return None (qcore converts that module)"
        )
    return TrainingSummary(method="train_fn", train_fn=_describe(train_fn))


def run_builtin_loop(
    prepared: GraphModule,
    batches: Iterable,
    epochs: int,
    lr: Optional[float],
    loss_fn: Optional[Callable],
    split_batch: Callable[[Any, int], tuple],
    progress: Callable[[Iterable, str], Iterable],
) -> tuple[TrainingSummary, Optional[tuple]]:
    """Adam over ``batches`` for ``epochs`` epochs; returns the summary and the first batch's inputs.

    ``split_batch(batch, index)`` returns ``(inputs, targets)`` (and checks shapes). With two or
    more epochs, the last one freezes the fake-quantizers' ranges and batch-norm statistics.
    """
    import qcore
    from qcore.observers import disable_observer

    lr = DEFAULT_QAT_LR if lr is None else float(lr)
    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    parameters = [p for p in prepared.parameters() if p.requires_grad]
    if not parameters:
        raise QATError("the model has no trainable parameters (requires_grad=True): nothing for QAT to fine-tune")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    qcore.move_exported_model_to_train(prepared)
    epoch_losses = []
    sample: Optional[tuple] = None
    batches_per_epoch = 0
    with torch.enable_grad():
        for epoch in range(epochs):
            frozen = epochs >= 2 and epoch == epochs - 1
            if frozen:
                prepared.apply(disable_observer)
                qcore.move_exported_model_to_eval(prepared)
            total, count = 0.0, 0
            for index, batch in enumerate(progress(batches, f"QAT epoch {epoch + 1}/{epochs}")):
                inputs, targets = split_batch(batch, index)
                optimizer.zero_grad()
                output = prepared(*inputs)
                try:
                    loss = loss_fn(output, *targets)
                except Exception as exc:
                    shapes = ", ".join(_shape_of(t) for t in targets)
                    raise QATError(
                        f"loss_fn {_describe(loss_fn)}(output, *targets) failed on QAT batch {index}: {type(exc).__name__}: "
                        f"{exc} (output {_shape_of(output)}, target(s) {shapes}); the batches must be (inputs..., target) "
                        f"with targets loss_fn accepts"
                    ) from exc
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise QATError(
                        f"loss_fn {_describe(loss_fn)} must return a scalar tensor, got "
                        f"{'a tensor of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
                    )
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise QATError(
                        f"QAT loss is {value} at epoch {epoch + 1}, batch {index}: training diverged; "
                        f"lower qat_lr (now {lr:g}) or check the targets"
                    )
                loss.backward()
                optimizer.step()
                total += value
                count += 1
                sample = sample or tuple(t.detach() for t in inputs)
            if count == 0:
                raise QATError(
                    f"calibration gave no batches in QAT epoch {epoch + 1}: the built-in loop needs at least one "
                    f"(inputs..., target) batch per epoch"
                )
            batches_per_epoch = count
            epoch_losses.append(total / count)
    summary = TrainingSummary(
        method="built-in loop", epochs=epochs, lr=lr, optimizer="Adam", loss_fn=_describe(loss_fn),
        epoch_losses=tuple(epoch_losses), batches_per_epoch=batches_per_epoch,
        frozen_last_epoch=epochs >= 2,
    )
    return summary, sample
