"""QAT of a ``prepare_qat_pt2e`` conv-bn model under ``DistributedDataParallel`` on 2 gloo ranks.

With ``qcore.distributed.sync_every`` the fake-quant ranges and batch-norm running statistics
stay identical, so both ranks convert to the same program (without it they do not). The slow
test trains on scikit-learn's digits: 2 ranks with 32 images each per step against one process
with the same 64-image batches, accuracy within 0.5 points.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from qcore.distributed import program_digest, sync_batch_norm_stats, sync_every, sync_qat_state
from qcore.reference import ReferenceQuantizer

from test_distributed_sync import qparams, run_ranks


class SmallConvBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def _prepare(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    exported = torch.export.export(copy.deepcopy(model).train(), (example,)).module()
    quantizer = ReferenceQuantizer().set_global(ReferenceQuantizer.default_config(is_qat=True))
    return qcore.prepare_qat_pt2e(exported, quantizer)


def _ddp_train(prepared: torch.fx.GraphModule, steps: list, lr: float, sync: bool, every: int = 1,
               optimizer: str = "sgd", on_epoch: Any = None) -> torch.fx.GraphModule:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(prepared, broadcast_buffers=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    with sync_every(model, every=every) if sync else contextlib.nullcontext():
        for index, (x, y) in enumerate(steps):
            if on_epoch is not None:
                on_epoch(index)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    qcore.move_exported_model_to_eval(prepared)
    return prepared


# --------------------------------------------------------------------------- fast: a few steps
def rank_trains_a_few_steps(out_dir: str) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SmallConvBn()
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 1, 8, 8, generator=generator) * (1 + i), torch.randint(0, 4, (8,), generator=generator)) for i in range(4)]
    mine = [(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]) for x, y in data]  # half of each step's batch
    results = {}
    exported = torch.export.export(copy.deepcopy(model).train(), (mine[0][0],)).module()
    quantizer = ReferenceQuantizer().set_global(ReferenceQuantizer.default_config(is_qat=True))
    for sync in (True, False):
        prepared = _ddp_train(qcore.prepare_qat_pt2e(exported, quantizer), mine, lr=0.05, sync=sync)
        converted = qcore.convert_pt2e(prepared)
        bn = {name: buf.clone() for name, buf in prepared.named_buffers() if name.startswith("bn.")}
        results[sync] = {"digest": program_digest(converted), "qparams": qparams(converted), "bn": bn}
    return results


def rank_quantizes_with_a_ddp_train_fn(out_dir: str) -> str:
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SmallConvBn()
    generator = torch.Generator().manual_seed(2)
    mine = [(torch.randn(8, 1, 8, 8, generator=generator)[rank * 4:(rank + 1) * 4], torch.randint(0, 4, (8,), generator=generator)[rank * 4:(rank + 1) * 4])
            for _ in range(4)]

    def train_fn(prepared: torch.fx.GraphModule) -> None:  # the user's loop: DDP, no sync of its own
        _ddp_train(prepared, mine, lr=0.05, sync=False)

    result = qcore.quantize(model.train(), (mine[0][0],), backend="reference", qat=True, train_fn=train_fn, measure_latency=False)
    return program_digest(result.converted)  # qcore synced after train_fn


@pytest.mark.slow
def test_quantize_with_a_ddp_train_fn_gives_one_program(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks("test_distributed_qat", "rank_quantizes_with_a_ddp_train_fn", tmp_path)
    assert rank0 == rank1


def test_ddp_qat_ranks_convert_to_the_same_program(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks("test_distributed_qat", "rank_trains_a_few_steps", tmp_path)
    assert rank0[True]["digest"] == rank1[True]["digest"]
    assert rank0[True]["qparams"] == rank1[True]["qparams"]
    for name, value in rank0[True]["bn"].items():
        assert torch.equal(value, rank1[True]["bn"][name]), name
    assert int(rank0[True]["bn"]["bn.num_batches_tracked"]) == 4
    # the control: the same run without syncing leaves the ranks with different programs
    assert rank0[False]["digest"] != rank1[False]["digest"]
    assert not torch.equal(rank0[False]["bn"]["bn.running_mean"], rank1[False]["bn"]["bn.running_mean"])


def test_single_process_sync_every_counts_and_changes_nothing() -> None:
    torch.manual_seed(0)
    prepared = _prepare(SmallConvBn(), torch.randn(4, 1, 8, 8))
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    assert sync_qat_state(prepared) == (6, 2)  # 6 fake-quantizers; bn running mean and var
    assert sync_batch_norm_stats(prepared) == 2
    assert all(torch.equal(before[k], v) for k, v in prepared.state_dict().items())
    with sync_every(prepared, every=3) as hook:
        for _ in range(7):
            prepared(torch.randn(4, 1, 8, 8))
        with torch.no_grad():
            prepared(torch.randn(4, 1, 8, 8))  # evaluation: not counted, never syncs
    assert (hook.forwards, hook.syncs) == (7, 3)
    with pytest.raises(ValueError, match="every must be a positive int"):
        sync_every(prepared, every=0)


# --------------------------------------------------------------------------- slow: digits accuracy
DIGITS_BATCH = 64
QAT_EPOCHS = 3
QAT_LR = 5e-4


def _digits_steps(data: tuple, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The single process's batches of 64, epoch after epoch (the order test_qat_digits uses)."""
    from test_qat_digits import _batches

    x_train, y_train = data[0], data[1]
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(QAT_EPOCHS):
        steps += [(x_train[i], y_train[i]) for i in _batches(len(y_train), generator)]
    return steps


def _accuracy(model: Any, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            xb = x[start:start + batch]
            n = len(xb)
            if n < batch:
                xb = torch.cat([xb, xb.new_zeros(batch - n, *xb.shape[1:])])
            correct += int((model(xb)[:n].argmax(1) == y[start:start + n]).sum())
    return 100.0 * correct / len(y)


def _freeze_schedule(prepared: torch.fx.GraphModule, steps_per_epoch: int) -> Any:
    from qcore import observers

    def on_step(index: int) -> None:
        if index == steps_per_epoch * (QAT_EPOCHS - 1):  # the last epoch: ranges and batch norm frozen
            prepared.apply(observers.disable_observer)
            qcore.move_exported_model_to_eval(prepared)

    return on_step


def rank_qat_digits(out_dir: str, float_path: str) -> dict:
    import torch.distributed as dist
    from test_qat_digits import DigitsCNN, load_digits_split

    rank, half = dist.get_rank(), DIGITS_BATCH // 2
    data = load_digits_split(0)
    model = DigitsCNN()
    model.load_state_dict(torch.load(float_path))
    steps = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in _digits_steps(data, seed=1)]
    prepared = _prepare(model, steps[0][0])
    torch.manual_seed(1)
    _ddp_train(prepared, steps, lr=QAT_LR, sync=True, optimizer="adam",
               on_epoch=_freeze_schedule(prepared, len(steps) // QAT_EPOCHS))
    converted = qcore.convert_pt2e(prepared)
    return {"digest": program_digest(converted), "accuracy": _accuracy(converted, data[2], data[3], half)}


@pytest.mark.slow
def test_ddp_qat_on_digits_matches_one_process_within_half_a_point(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from test_qat_digits import load_digits_split, train_float

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits_split(0)
        model = train_float(0, data)
        float_path = tmp_path / "float.pt"
        torch.save(model.state_dict(), float_path)
        # one process, the same 64-image batches
        steps = _digits_steps(data, seed=1)
        prepared = _prepare(model, steps[0][0])
        from qcore import observers

        optimizer = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=QAT_LR)
        schedule = _freeze_schedule(prepared, len(steps) // QAT_EPOCHS)
        for index, (x, y) in enumerate(steps):
            schedule(index)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(prepared(x), y).backward()
            optimizer.step()
        qcore.move_exported_model_to_eval(prepared)
        single = _accuracy(qcore.convert_pt2e(prepared), data[2], data[3], DIGITS_BATCH)
        assert observers  # (imported for the schedule)
    finally:
        torch.set_num_threads(threads)
    rank0, rank1 = run_ranks("test_distributed_qat", "rank_qat_digits", tmp_path, timeout_s=300, args=(str(float_path),))
    print(f"\ndigits QAT accuracy: one process {single:.2f}%, 2 DDP ranks {rank0['accuracy']:.2f}% / {rank1['accuracy']:.2f}%")
    assert rank0["digest"] == rank1["digest"]
    assert rank0["accuracy"] == rank1["accuracy"]
    assert abs(rank0["accuracy"] - single) <= 0.5, (rank0["accuracy"], single)
