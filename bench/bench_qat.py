"""How long ``prepare_qat_pt2e`` takes on a 20 conv-bn-relu model: first call, later calls.

qcore's conv-bn fusion matches graph structure (nothing is traced per call), so after the
first call (imports, plugin loading) a prepare costs only graph walks. torchao re-traces its
conv-bn patterns on each call; it is measured side by side when installed.

    python bench/bench_qat.py [--repeat 5] [--blocks 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


class ConvBnStack(torch.nn.Module):
    def __init__(self, blocks: int, channels: int = 8) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, channels, 3, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU()]
        for _ in range(blocks - 1):
            layers += [torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.BatchNorm2d(channels), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def exported(blocks: int) -> tuple[torch.fx.GraphModule, tuple]:
    example = (torch.randn(2, 3, 16, 16),)
    return torch.export.export(ConvBnStack(blocks).train(), example).module(), example


def time_calls(prepare, make_quantizer, model: torch.fx.GraphModule, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        m = copy.deepcopy(model)
        quantizer = make_quantizer()
        start = time.perf_counter()
        prepare(m, quantizer)
        times.append(time.perf_counter() - start)
    return times


def bench_qcore(model: torch.fx.GraphModule, repeat: int) -> tuple[list[float], list[float]]:
    import qcore
    from qcore.passes.fuse_conv_bn_qat import fuse_conv_bn_qat
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    def make_quantizer():
        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))

    prepare_times = time_calls(qcore.prepare_qat_pt2e, make_quantizer, model, repeat)
    fuse_times = []
    for _ in range(repeat):
        annotated = make_quantizer().annotate(copy.deepcopy(model))
        start = time.perf_counter()
        fuse_conv_bn_qat(annotated)
        fuse_times.append(time.perf_counter() - start)
    return prepare_times, fuse_times


def bench_torchao(model: torch.fx.GraphModule, repeat: int) -> list[float] | None:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
    except ImportError:
        return None

    def make_quantizer():
        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))

    return time_calls(prepare_qat_pt2e, make_quantizer, model, repeat)


def describe(name: str, times: list[float]) -> str:
    later = times[1:] or times
    return f"{name:<28} first {times[0]:7.3f} s   later: median {statistics.median(later):7.3f} s  min {min(later):7.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="calls per library (the first is reported apart)")
    parser.add_argument("--blocks", type=int, default=20, help="conv-bn-relu blocks")
    args = parser.parse_args()
    model, example = exported(args.blocks)
    print(f"prepare_qat_pt2e on {args.blocks} conv-bn-relu blocks (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    prepare_times, fuse_times = bench_qcore(model, args.repeat)
    print(describe("qcore prepare_qat_pt2e", prepare_times))
    print(describe("  of which conv-bn fusion", fuse_times))
    torchao_times = bench_torchao(model, args.repeat)
    if torchao_times is None:
        print("torchao not installed: no side-by-side figure")
    else:
        print(describe("torchao prepare_qat_pt2e", torchao_times))


if __name__ == "__main__":
    main()
