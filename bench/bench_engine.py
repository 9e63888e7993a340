"""Prepare + calibrate + convert time on deep MLPs, qcore beside torchao in one run.

An MLP of N blocks of Linear(32, 32) + ReLU (800 blocks: 3,202 graph nodes), quantized for
XNNPACK (int8, histogram activation observers, per-tensor weights). Prints seconds per stage
and the ratios. torchao is measured when installed.

    python bench/bench_engine.py                 # 200 and 800 blocks
    python bench/bench_engine.py --blocks 50 --repeat 1
"""

from __future__ import annotations

import argparse
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
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_flow(name: str, prepare, convert, quantizer, exported, example) -> dict:
    prepared, t_prepare = timed(lambda: prepare(exported, quantizer))
    _, t_calibrate = timed(lambda: [prepared(torch.randn_like(example)) for _ in range(4)])
    converted, t_convert = timed(lambda: convert(prepared))
    ops = sum(1 for n in converted.graph.nodes if n.op == "call_function" and "quantize" in str(n.target))
    return {"name": name, "prepare": t_prepare, "calibrate": t_calibrate, "convert": t_convert, "qdq_ops": ops, "model": converted}


def qcore_flow(exported, example):
    import qcore
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    return run_flow("qcore", qcore.prepare_pt2e, qcore.convert_pt2e, quantizer, exported, example)


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
        results = [qcore_flow(exported, example)]
        if not args.no_torchao:
            peer = torchao_flow(torch.export.export(model, (example,)).module(), example)
            if peer is not None:
                results.append(peer)
        print(f"\n{blocks} blocks ({nodes} graph nodes)")
        print(f"{'flow':8} {'prepare s':>10} {'calib s':>8} {'convert s':>10} {'prep+conv s':>12} {'q/dq ops':>9}")
        for r in results:
            total = r["prepare"] + r["convert"]
            totals[(r["name"], blocks)] = total
            print(f"{r['name']:8} {r['prepare']:10.2f} {r['calibrate']:8.2f} {r['convert']:10.2f} {total:12.2f} {r['qdq_ops']:9d}")
        if len(results) == 2:
            a, b = results
            with torch.no_grad():
                diff = (a["model"](example) - b["model"](example)).abs().max().item()
            print(f"speedup prepare+convert torchao/qcore: {(b['prepare'] + b['convert']) / (a['prepare'] + a['convert']):.1f}x; max |qcore - torchao| = {diff:.2e}")
    if ("qcore", 200) in totals and ("qcore", 800) in totals:
        print(f"\nqcore 800-block / 200-block time: {totals[('qcore', 800)] / totals[('qcore', 200)]:.2f}x (target <= 4.5x)")


if __name__ == "__main__":
    main()
