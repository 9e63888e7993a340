"""``qcore.distributed.sync_observers`` across 2 gloo processes on 127.0.0.1.

Each rank calibrates half the batches (round robin), syncs and converts. Against one process
that calibrates every batch: min/max and per-channel qparams bit-equal, moving averages synced
after every batch bit-equal, histograms equal to ``merge_histograms`` of the two halves (bit for
bit) and within a small tolerance of the one-stream histogram; both ranks' programs identical.

``run_ranks`` (used by the other test_distributed_* modules) starts the ranks as subprocesses
with torchrun's environment, a free port and a hard timeout, and kills them if it passes.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import qcore
from qcore import observers
from qcore.distributed import (
    UnsupportedObserverError,
    merge_histograms,
    program_digest,
    register_sync,
    shard,
    sync_observers,
)
from qcore.errors import QuantizeError
from qcore.reference import ReferenceQuantizer
from qcore.spec import QuantizationConfig, QuantizationSpec

TESTS = Path(__file__).resolve().parent
SPAWN_TIMEOUT_S = 90.0
qd = torch.ops.quantized_decomposed


# --------------------------------------------------------------------------- spawning ranks
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world_size: int, port: int, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def run_ranks(module: str, function: str, out_dir: Path, world_size: int = 2, timeout_s: float = SPAWN_TIMEOUT_S,
              args: tuple = ()) -> list[Any]:
    """Run ``module.function(out_dir, *args)`` in ``world_size`` processes (gloo on 127.0.0.1,
    process group initialised by the child); return each rank's pickled result, rank order.
    The processes are killed when ``timeout_s`` passes, and the test fails."""
    port = free_port()
    code = textwrap.dedent(
        f"""
        import datetime, pickle, sys, torch, torch.distributed as dist
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        import {module} as m
        result = m.{function}(*pickle.loads({pickle.dumps((str(out_dir),) + args)!r}))
        with open({str(out_dir)!r} + f"/rank{{dist.get_rank()}}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.destroy_process_group()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=rank_env(rank, world_size, port), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {world_size} ranks did not finish within {timeout_s} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (code_, out, err) in enumerate(outputs):
        assert code_ == 0, f"rank {rank} exited {code_}:\n{err[-3000:]}"
    results = []
    for rank in range(world_size):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


# --------------------------------------------------------------------------- the model and data
class ConvLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return ConvLinear().eval()


def batches(n: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # different scales per batch, so the running range grows at different points
    return [torch.randn(4, 3, 8, 8, generator=generator) * (0.5 + 0.4 * i) + 0.1 * i for i in range(n)]


def config(kind: str) -> QuantizationConfig:
    if kind == "histogram":
        return ReferenceQuantizer.default_config()
    act_ctr = {"minmax": observers.MinMaxObserver, "moving_average": observers.MovingAverageMinMaxObserver.with_args(averaging_constant=0.3)}[kind]
    weight_ctr = observers.PerChannelMinMaxObserver if kind == "minmax" else observers.MovingAveragePerChannelMinMaxObserver.with_args(averaging_constant=0.3)
    act = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=act_ctr, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    weight = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=weight_ctr, quant_min=-127, quant_max=127,
                              qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QuantizationConfig(act, act, weight, None, False)


@functools.lru_cache(maxsize=1)
def _exported() -> torch.fx.GraphModule:
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(make_model(), (batches(1)[0],), dynamic_shapes=({0: batch},)).module()


def prepare(kind: str) -> torch.fx.GraphModule:
    """A fresh prepared model (prepare_pt2e copies the exported graph: one export serves all)."""
    return qcore.prepare_pt2e(_exported(), ReferenceQuantizer().set_global(config(kind)))


def qparams(converted: torch.fx.GraphModule) -> list[tuple]:
    """(node, scale, zero point) of every quantize and dequantize op, exactly (Python floats
    compare bit for bit; per channel: lists)."""
    found = []
    for node in converted.graph.nodes:
        if node.target in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default):
            found.append((node.name, float(node.args[1]), int(node.args[2])))
        elif node.target in (qd.quantize_per_channel.default, qd.dequantize_per_channel.default):
            scale, zero_point = (getattr(converted, str(a.target)) for a in node.args[1:3])
            found.append((node.name, scale.tolist(), zero_point.tolist()))
    return found


def observer_state(prepared: torch.nn.Module) -> dict:
    return {name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in qcore.distributed.observer_modules(prepared)}


def calibrate_and_convert(prepared: torch.fx.GraphModule, data: list, sync_each_batch: bool) -> None:
    with torch.no_grad():
        for batch in data:
            prepared(batch)
            if sync_each_batch:
                sync_observers(prepared)


# --------------------------------------------------------------------------- what each rank runs
KINDS = (("minmax", False), ("histogram", False), ("moving_average", True))


def rank_calibrates_half_each_kind(out_dir: str) -> dict:
    results: dict[str, Any] = {kind: rank_calibrates_half(kind, each_batch) for kind, each_batch in KINDS}
    results["quantize"] = rank_runs_quantize()
    results["mismatch"] = rank_with_a_different_model()
    return results


def quantize_all_batches(**options: Any) -> list:
    result = qcore.quantize(make_model(), (batches(1)[0],), backend="reference", config=config("minmax"),
                            measure_latency=False, **options)
    return qparams(result.converted)


def rank_runs_quantize() -> dict:
    """qcore.quantize on every rank: sharding the calibration (default) or using it as given."""
    import torch.distributed as dist

    sharded = quantize_all_batches(calibration=batches())
    mine = batches()[dist.get_rank()::2]
    as_given = quantize_all_batches(calibration=mine, shard_calibration=False)
    try:
        quantize_all_batches(calibration=[(b, torch.zeros(4, dtype=torch.long)) for b in batches()], qat=True, qat_epochs=1)
        refused = ""
    except QuantizeError as exc:
        refused = str(exc)
    return {"sharded": sharded, "as_given": as_given, "refused": refused}


def rank_with_a_different_model() -> str:
    import torch.distributed as dist

    prepared = prepare("minmax")
    if dist.get_rank() == 1:
        prepared.add_module("activation_post_process_99", observers.MinMaxObserver())
    try:
        sync_observers(prepared)
    except qcore.distributed.DistributedError as exc:
        return str(exc)
    return ""


def rank_calibrates_half(kind: str, sync_each_batch: bool = False) -> dict:
    prepared = prepare(kind)
    mine = list(shard(batches()))
    calibrate_and_convert(prepared, mine, sync_each_batch)
    before = observer_state(prepared)
    synced = sync_observers(prepared)
    after = observer_state(prepared)
    converted = qcore.convert_pt2e(prepared)
    return {"before": before, "after": after, "qparams": qparams(converted), "digest": program_digest(converted),
            "synced": synced, "code": converted.code}


def one_process(kind: str) -> tuple[list, str]:
    """One process calibrating every batch; for moving averages (synced after every step on the
    ranks) each step's batch is the union of the two ranks' batches of that step."""
    prepared = prepare(kind)
    data = batches()
    if kind == "moving_average":
        data = [torch.cat([data[i], data[i + 1]]) for i in range(0, len(data), 2)]
    calibrate_and_convert(prepared, data, sync_each_batch=False)
    converted = qcore.convert_pt2e(prepared)
    return qparams(converted), converted.code


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One spawn of 2 ranks for every observer kind (the process start-up dominates the time)."""
    ranks = run_ranks("test_distributed_sync", "rank_calibrates_half_each_kind", tmp_path_factory.mktemp("sync"))
    return {key: [rank[key] for rank in ranks] for key in ranks[0]}


@pytest.mark.parametrize("kind", ["minmax", "moving_average"])
def test_min_max_and_per_channel_qparams_bit_equal_one_process(two_rank_results: dict, kind: str) -> None:
    rank0, rank1 = two_rank_results[kind]
    expected, code = one_process(kind)
    assert len(expected) >= 6 and sum(isinstance(s, list) for _, s, _ in expected) == 2  # per tensor and per channel
    assert rank0["qparams"] == expected  # bit-equal: Python floats compare exactly
    assert rank1["qparams"] == expected
    assert rank0["digest"] == rank1["digest"]
    assert rank0["code"] == code


def test_ranks_saw_different_data_before_syncing(two_rank_results: dict) -> None:
    rank0, rank1 = two_rank_results["minmax"]
    name = next(iter(rank0["before"]))
    assert not torch.equal(rank0["before"][name]["max_val"], rank1["before"][name]["max_val"])
    assert rank0["synced"] == rank1["synced"] == len(rank0["before"]) >= 5


def test_histograms_are_the_merge_of_the_halves_and_near_one_stream(two_rank_results: dict) -> None:
    rank0, rank1 = two_rank_results["histogram"]
    assert rank0["digest"] == rank1["digest"]
    # the documented rule, bit for bit: merge_histograms of one observer per half, in rank order
    halves = []
    for rank in range(2):
        prepared = prepare("histogram")
        calibrate_and_convert(prepared, list(shard(batches(), rank=rank, world_size=2)), sync_each_batch=False)
        halves.append(dict(qcore.distributed.observer_modules(prepared)))
    one_stream = prepare("histogram")
    calibrate_and_convert(one_stream, batches(), sync_each_batch=False)
    streams = dict(qcore.distributed.observer_modules(one_stream))
    histogram_names = [n for n, m in halves[0].items() if isinstance(m, observers.HistogramObserver)]
    assert len(histogram_names) == 4
    for name in histogram_names:
        merged = merge_histograms([halves[0][name], halves[1][name]])
        synced = rank0["after"][name]
        assert torch.equal(synced["histogram"], merged.histogram)
        assert torch.equal(synced["min_val"], merged.min_val) and torch.equal(synced["max_val"], merged.max_val)
        stream = streams[name]
        # the range is exact; the total count up to float32 rounding of re-binned fractions; the qparams within 1% of the one-stream ones
        assert torch.equal(merged.min_val, stream.min_val) and torch.equal(merged.max_val, stream.max_val)
        assert float(merged.histogram.sum()) == pytest.approx(float(stream.histogram.sum()), rel=1e-6)
        (s_merged, z_merged), (s_stream, z_stream) = merged.calculate_qparams(), stream.calculate_qparams()
        assert abs(float(s_merged) / float(s_stream) - 1) < 0.01, (float(s_merged), float(s_stream))
        assert abs(int(z_merged) - int(z_stream)) <= 2
    expected, _ = one_process("histogram")
    per_channel = [(n, s, z) for n, s, z in expected if isinstance(s, list)]
    assert [q for q in rank0["qparams"] if isinstance(q[1], list)] == per_channel  # weights: exact


def test_quantize_under_two_ranks_shards_and_matches_one_process(two_rank_results: dict) -> None:
    expected = quantize_all_batches(calibration=batches())
    for rank in two_rank_results["quantize"]:
        assert rank["sharded"] == expected  # each rank calibrated half, synced: bit-equal
        assert rank["as_given"] == expected  # the user's own shards, shard_calibration=False
        assert "built-in QAT loop) does not run across processes" in rank["refused"]


def test_ranks_with_different_models_are_refused(two_rank_results: dict) -> None:
    for message in two_rank_results["mismatch"]:
        assert message.startswith("the ranks disagree on the observers of the model: rank 0 has 6 observers"), message
        assert "rank 1 has 7 observers" in message


def test_single_process_sync_is_a_no_op() -> None:
    prepared = prepare("minmax")
    calibrate_and_convert(prepared, batches(2), sync_each_batch=False)
    before = observer_state(prepared)
    assert sync_observers(prepared) == len(before) >= 5
    after = observer_state(prepared)
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])


class _PluginObserver(observers.MinMaxObserver):
    """A plugin's observer: may keep more state, so it is not synced by the MinMax rule."""


def test_unknown_observer_class_is_refused_by_name() -> None:
    prepared = prepare("minmax")
    name, module = qcore.distributed.observer_modules(prepared)[0]
    prepared._modules[name] = torch.ao.quantization.observer.HistogramObserver()
    with pytest.raises(UnsupportedObserverError, match=r"torch\.ao\.quantization\.observer\.HistogramObserver at 'activation_post_process_0'.*register_sync"):
        sync_observers(prepared)
    prepared._modules[name] = _PluginObserver()
    with pytest.raises(UnsupportedObserverError, match="_PluginObserver"):
        sync_observers(prepared)
    prepared._modules[name] = observers.FakeQuantize(observer=_PluginObserver)
    with pytest.raises(UnsupportedObserverError, match=r"_PluginObserver at 'activation_post_process_0\.activation_post_process'"):
        sync_observers(prepared)


def test_a_class_joins_through_register_sync_or_a_method() -> None:
    calls: list[str] = []

    class WithMethod(observers.MinMaxObserver):
        def sync_across_ranks(self, collective: Any) -> None:
            calls.append(f"method {collective.world_size}")

    class Registered(observers.MinMaxObserver):
        pass

    register_sync(Registered, lambda module, collective: calls.append("registered"))
    model = torch.nn.Sequential(WithMethod(), Registered())
    assert sync_observers(model) == 2
    assert calls == []  # single process: nothing to combine, no rule runs
    with pytest.raises(TypeError, match="register_sync"):
        register_sync("not a class", print)  # type: ignore[arg-type]


def test_merge_histograms_refuses_mismatched_observers() -> None:
    with pytest.raises(ValueError, match="different bins"):
        merge_histograms([observers.HistogramObserver(bins=8), observers.HistogramObserver(bins=16)])
    with pytest.raises(TypeError, match="MinMaxObserver"):
        merge_histograms([observers.MinMaxObserver()])  # type: ignore[list-item]


# --------------------------------------------------------------------------- the README's example


def _readme_distributed_example() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Calibration and QAT across processes"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python\n") + 10)]


def rank_runs_the_readme_example(out_dir: str) -> str:
    namespace: dict = {}
    exec(compile(_readme_distributed_example(), "README.md distributed example", "exec"), namespace)
    return program_digest(namespace["quantized"])


def test_readme_distributed_example_gives_one_process_program_on_two_ranks(tmp_path: Path) -> None:
    """The README's example, run as written on 2 gloo ranks (each calibrates half the batches)
    and in this process (all of them): the same program everywhere."""
    rank0, rank1 = run_ranks("test_distributed_sync", "rank_runs_the_readme_example", tmp_path)
    assert rank0 == rank1 == rank_runs_the_readme_example(str(tmp_path))
