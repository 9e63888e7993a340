"""``qcore quantize`` under ``torchrun --nproc-per-node 2`` (gloo on 127.0.0.1).

Rank 0 writes one output and one report, the other rank writes nothing and exits 0; a rank
that is killed, or hangs, makes the other fail with one line within the timeout, and nothing
is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed_sync import free_port, rank_env

USER_MODULE = '''
import os, signal, time, torch

def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()

def loader():
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        if os.environ.get("FAIL_RANK") == os.environ.get("RANK") and i == 2:
            if os.environ.get("FAIL_HOW") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)  # hangs
        yield (torch.randn(4, 8, generator=g),)
'''


def _command(tmp_path: Path) -> list[str]:
    return ["quantize", "user_model:model", "--calibration", "user_model:loader", "--backend", "reference",
            "--out", str(tmp_path / "out" / "model.pt2"), "--report", str(tmp_path / "out" / "report")]


def _setup(tmp_path: Path) -> None:
    (tmp_path / "user_model.py").write_text(USER_MODULE)
    (tmp_path / "out").mkdir()


def test_torchrun_two_ranks_write_one_output_and_one_report(tmp_path: Path) -> None:
    _setup(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "qcore", *_command(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["model.pt2", "report"]  # one output, no temporaries
    assert "report.md" in os.listdir(tmp_path / "out" / "report")
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports
    assert "qcore: error" not in run.stderr

    import qcore

    program = qcore.load(tmp_path / "out" / "model.pt2")
    assert program.meta["qcore_backend"] == "reference"


def _two_ranks_one_failing(tmp_path: Path, how: str, timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """Rank 1 is killed (or hangs) at its third batch; returns rank 0's run and its wall time."""
    _setup(tmp_path)
    port = free_port()
    extra = {"FAIL_RANK": "1", "FAIL_HOW": how, "QCORE_DIST_TIMEOUT": str(timeout_s), "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "qcore", *_command(tmp_path)], cwd=tmp_path,
                         env=rank_env(rank, 2, port, extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    start = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=timeout_s + 60)
        elapsed = time.monotonic() - start
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 did not fail within {timeout_s + 60} s of rank 1 {'dying' if how == 'kill' else 'hanging'}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(procs[0].args, procs[0].returncode, out, err), elapsed


def _assert_one_line_and_nothing_written(run: subprocess.CompletedProcess, tmp_path: Path) -> str:
    assert run.returncode == 1, run.stderr[-3000:]  # not -6: gloo's destructors are not run after a failure
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("qcore: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert os.listdir(tmp_path / "out") == []  # no partial output
    return errors[0]


def test_a_killed_rank_makes_the_other_fail_with_one_line(tmp_path: Path) -> None:
    run, elapsed = _two_ranks_one_failing(tmp_path, "kill", timeout_s=30)
    line = _assert_one_line_and_nothing_written(run, tmp_path)
    assert "rank 0 of 2" in line and "a rank died" in line, line
    assert re.search(r"Connection (closed|reset) by peer", line), line  # gloo's words, as the timing falls
    assert elapsed < 30 + 30  # a dead peer is noticed at once, well within the timeout (start-up included)


@pytest.mark.slow
def test_a_hanging_rank_makes_the_other_fail_after_the_timeout(tmp_path: Path) -> None:
    run, elapsed = _two_ranks_one_failing(tmp_path, "hang", timeout_s=8)
    line = _assert_one_line_and_nothing_written(run, tmp_path)
    assert "rank 0 of 2" in line and "timeout" in line, line
    assert elapsed < 8 + 40
