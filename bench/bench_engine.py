"""Prepare + calibrate + convert time on deep MLPs, qcore beside torchao in one run.

An MLP of N blocks of Linear(32, 32) + ReLU (800 blocks: 3,202 graph nodes), quantized for
XNNPACK (int8, histogram activation observers, per-tensor weights). Prints seconds per stage
and the ratios. torchao is measured when installed.

    python bench/bench_engine.py                 # 200 and 800 blocks
    python bench/bench_engine.py --blocks 50 --no-torchao
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


class DeepMLP(torch.nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def timed(fn):
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def run_flow(name: str, prepare, convert, quantizer, exported, example, repeat: int = 1) -> dict:
    runs = []
    for _ in range(repeat):
        prepared, t_prepare, c_prepare = timed(lambda: prepare(exported, quantizer))
        _, t_calibrate, _ = timed(lambda: [prepared(torch.randn_like(example)) for _ in range(4)])
        converted, t_convert, c_convert = timed(lambda: convert(prepared))
        runs.append((t_prepare, t_calibrate, t_convert, c_prepare + c_convert))
    ops = sum(1 for n in converted.graph.nodes if n.op == "call_function" and "quantize" in str(n.target))
    median = [statistics.median(column) for column in zip(*runs)]
    return {
        "name": name,
        "prepare": median[0],
        "calibrate": median[1],
        "convert": median[2],
        "cpu": median[3],
        "qdq_ops": ops,
        "model": converted,
    }


def qcore_flow(exported, example, repeat: int = 1):
    import qcore
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    return run_flow("qcore", qcore.prepare_pt2e, qcore.convert_pt2e, quantizer, exported, example, repeat)


def torchao_flow(exported, example):
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    except ImportError:
        return None
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    return run_flow("torchao", prepare_pt2e, convert_pt2e, quantizer, exported, example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[200, 800])
    parser.add_argument("--repeat", type=int, default=3, help="qcore runs per size (medians are shown)")
    parser.add_argument("--no-torchao", action="store_true", help="measure qcore only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    totals = {}
    for blocks in args.blocks:
        model = DeepMLP(blocks).eval()
        example = torch.randn(16, 32)
        exported = torch.export.export(model, (example,)).module()
        nodes = len(exported.graph.nodes)
        results = [qcore_flow(exported, example, max(1, args.repeat))]
        if not args.no_torchao:
            peer = torchao_flow(torch.export.export(model, (example,)).module(), example)
            if peer is not None:
                results.append(peer)
        print(f"\n{blocks} blocks ({nodes} graph nodes)")
        print(f"{'flow':8} {'prepare s':>10} {'calib s':>8} {'convert s':>10} {'prep+conv s':>12} {'(cpu s)':>8} {'q/dq ops':>9}")
        for r in results:
            total = r["prepare"] + r["convert"]
            totals[(r["name"], blocks)] = (total, r["cpu"])
            print(
                f"{r['name']:8} {r['prepare']:10.2f} {r['calibrate']:8.2f} {r['convert']:10.2f} {total:12.2f} "
                f"{r['cpu']:8.2f} {r['qdq_ops']:9d}"
            )
        if len(results) == 2:
            a, b = results
            with torch.no_grad():
                diff = (a["model"](example) - b["model"](example)).abs().max().item()
            print(
                f"speedup prepare+convert torchao/qcore: {(b['prepare'] + b['convert']) / (a['prepare'] + a['convert']):.1f}x; "
                f"calibration torchao/qcore: {b['calibrate'] / a['calibrate']:.2f}x; max |qcore - torchao| = {diff:.2e}"
            )
    if ("qcore", 200) in totals and ("qcore", 800) in totals:
        (wall_200, cpu_200), (wall_800, cpu_800) = totals[("qcore", 200)], totals[("qcore", 800)]
        print(
            f"\nqcore 800-block / 200-block time: {wall_800 / wall_200:.2f}x wall, {cpu_800 / cpu_200:.2f}x cpu "
            f"(target <= 4.5x)"
        )


if __name__ == "__main__":
    main()
