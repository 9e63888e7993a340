"""Test accuracy of a small CNN on scikit-learn's 8x8 digits: float, PTQ and QAT.

The experiment is the one ``tests/test_qat_digits.py`` asserts on (float training, PTQ of the
batch-norm-folded model, a few epochs of QAT fine-tuning through ``prepare_qat_pt2e``); this
script prints its figures, optionally for several seeds, with 3-bit weights (where PTQ loses
more) and with the XNNPACK plugin's quantizer instead of the test-local one.

    python bench/bench_qat_digits.py [--seeds 0 1 2] [--bits 8 3] [--xnnpack]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_qat_digits import run_digits_experiment  # noqa: E402


def xnnpack_quantizers() -> dict:
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    ptq = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    qat = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    return {8: (ptq, qat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8], help="weight widths (activations stay 8-bit)")
    parser.add_argument("--xnnpack", action="store_true", help="use qcore_xnnpack's quantizer (8-bit only)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantizers = xnnpack_quantizers() if args.xnnpack else None
    bits = (8,) if args.xnnpack else tuple(args.bits)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        results = run_digits_experiment(seed=seed, weight_bits=bits, quantizers=quantizers)
        rows.append(results)
        figures = "  ".join(f"w{b}: PTQ {results[f'ptq_w{b}']:6.2f}%  QAT {results[f'qat_w{b}']:6.2f}%" for b in bits)
        print(f"seed {seed}: float {results['float']:6.2f}%  {figures}   ({time.perf_counter() - start:.1f} s)", flush=True)
    if len(rows) > 1:
        figures = "  ".join(
            f"w{b}: PTQ {statistics.mean(r[f'ptq_w{b}'] for r in rows):6.2f}%  QAT {statistics.mean(r[f'qat_w{b}'] for r in rows):6.2f}%"
            for b in bits
        )
        print(f"mean  : float {statistics.mean(r['float'] for r in rows):6.2f}%  {figures}")


if __name__ == "__main__":
    main()
