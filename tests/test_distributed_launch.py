"""qcore.distributed's single-process pieces: sharding, program digests, timeouts, one-line errors."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.distributed import DistributedError, on_rank_zero, process_group_from_environment, program_digest, shard
from qcore.distributed.collectives import _one_line
from qcore.distributed.launch import DEFAULT_TIMEOUT_S, timeout_from_environment


def test_shard_gives_every_batch_to_exactly_one_rank() -> None:
    for world_size in (1, 2, 3, 5):
        parts = [list(shard(iter(range(11)), rank=r, world_size=world_size)) for r in range(world_size)]
        assert sorted(sum(parts, [])) == list(range(11))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        list(shard(range(3), rank=2, world_size=2))


def test_program_digest_sees_code_and_every_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    result = qcore.quantize(model, (torch.randn(2, 4),), backend="reference", measure_latency=False, lower=False)
    converted = result.converted
    before = program_digest(converted)
    assert program_digest(converted) == before
    name = next(n.target for n in converted.graph.nodes if n.op == "get_attr")
    tensor = converted.get_buffer(name) if name in dict(converted.named_buffers()) else getattr(converted, name)
    flat = tensor.view(-1)
    flat[0] = flat[0] + 1 if tensor.is_floating_point() else flat[0] ^ 1
    assert program_digest(converted) != before


def test_timeouts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QCORE_DIST_TIMEOUT", raising=False)
    assert timeout_from_environment() == DEFAULT_TIMEOUT_S == 300.0
    monkeypatch.setenv("QCORE_DIST_TIMEOUT", "7.5")
    assert timeout_from_environment() == 7.5
    assert timeout_from_environment(3) == 3.0  # an explicit value wins
    monkeypatch.setenv("QCORE_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="QCORE_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
        timeout_from_environment()
    with pytest.raises(DistributedError, match="positive number of seconds"):
        timeout_from_environment(0)


def test_outside_torchrun_everything_is_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group_from_environment() as collective:
        assert (collective.active, collective.rank, collective.world_size) == (False, 0, 1)
        assert on_rank_zero(lambda: 42) == 42
        with pytest.raises(OSError, match="disk full"):
            on_rank_zero(lambda: (_ for _ in ()).throw(OSError("disk full")))


def test_transport_errors_become_one_line() -> None:
    raw = RuntimeError(
        "[/build/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5.\n"
        "Check the logs of the remote worker. GLHF!\nException raised from recv at x.cpp:1 (most recent call first):\nframe #0: ..."
    )
    assert _one_line(raw) == "Connection closed by peer [127.0.0.1]:5. Check the logs of the remote worker."
