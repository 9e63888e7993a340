"""Time qcore's HistogramObserver.calculate_qparams against torch.ao's on the same histogram.

Both observers see the same calibration batches (so their 2048-bin histograms are identical),
then each ``calculate_qparams`` is timed several times; the script prints the median times, the
speed-up and whether scale and zero point agree.

    python bench/bench_histogram.py            # the default suite of activation tensors
    python bench/bench_histogram.py --repeats 21 --threads 1

Times are per-thread CPU time (``time.thread_time``, robust on a shared machine) and wall-clock
(``time.perf_counter``); the speed-up is computed from CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch
from torch.ao.quantization.observer import HistogramObserver as AoHistogramObserver

from qcore.observers import HistogramObserver

_AO_DTYPE = {torch.uint8: torch.quint8, torch.int8: torch.qint8}


def _activations(seed: int) -> dict[str, list[torch.Tensor]]:
    """Calibration batches shaped like real activations (several batches each)."""
    torch.manual_seed(seed)  # layer initialisation
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    torch.nn.init.kaiming_normal_(conv.weight, generator=g)
    with torch.no_grad():
        conv_relu = [torch.relu(conv(randn(8, 16, 32, 32))) for _ in range(4)]
    linear = torch.nn.Linear(256, 512)
    with torch.no_grad():
        gelu = [torch.nn.functional.gelu(linear(randn(32, 64, 256))) for _ in range(4)]
    outliers = []
    for _ in range(4):
        x = randn(32, 64, 256)
        x.view(-1)[torch.randint(0, x.numel(), (20,), generator=g)] *= 40.0  # a few large values
        outliers.append(x)
    return {
        "conv+relu (4 batches)": conv_relu,
        "linear+gelu (4 batches)": gelu,
        "normal with outliers": outliers,
        "normal (4 batches)": [randn(32, 64, 256) * (1 + 0.2 * i) for i in range(4)],
    }


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def run(dtype: torch.dtype, qscheme: torch.qscheme, repeats: int) -> list[float]:
    speedups = []
    for name, batches in _activations(0).items():
        ao = AoHistogramObserver(dtype=_AO_DTYPE[dtype], qscheme=qscheme)
        qc = HistogramObserver(dtype=dtype, qscheme=qscheme)
        for x in batches:
            ao(x)
            qc(x)
        same_histogram = torch.equal(ao.histogram, qc.histogram)
        ao_qparams, qc_qparams = ao.calculate_qparams(), qc.calculate_qparams()  # warm up
        agree = torch.equal(ao_qparams[0], qc_qparams[0]) and torch.equal(ao_qparams[1], qc_qparams[1])
        ao_cpu, ao_wall = _median_time(ao.calculate_qparams, repeats)
        qc_cpu, qc_wall = _median_time(qc.calculate_qparams, repeats)
        speedups.append(ao_cpu / qc_cpu)
        print(
            f"  {name:26s} torch.ao {ao_cpu * 1e3:8.3f} ms ({ao_wall * 1e3:8.3f} wall)   "
            f"qcore {qc_cpu * 1e3:7.3f} ms ({qc_wall * 1e3:7.3f} wall)   x{ao_cpu / qc_cpu:6.1f}   "
            f"histogram {'same' if same_histogram else 'DIFFERENT'}, "
            f"qparams {'agree' if agree else 'DISAGREE'} (scale {float(qc_qparams[0][0]):.6g}, "
            f"zero point {int(qc_qparams[1][0])})"
        )
    return speedups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per observer (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    speedups = []
    for dtype, qscheme in (
        (torch.uint8, torch.per_tensor_affine),
        (torch.int8, torch.per_tensor_affine),
        (torch.int8, torch.per_tensor_symmetric),
    ):
        print(f"{dtype}, {qscheme}, 2048 bins:")
        speedups += run(dtype, qscheme, args.repeats)
    print(
        f"speed-up (torch.ao CPU time / qcore CPU time): median x{statistics.median(speedups):.1f}, "
        f"min x{min(speedups):.1f}, max x{max(speedups):.1f}"
    )


if __name__ == "__main__":
    main()
