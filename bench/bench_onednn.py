"""Benchmark: fp32 vs torchao int8 vs qcore int8 (oneDNN) on four CPU models, side by side.

Not a test. For each model it reports latency (median of ``--iters`` runs after warm-up) of

* fp32 eager, fp32 ``torch.compile``;
* torchao int8: ``lower_pt2e_quantized_to_x86`` (eager), and ``torch.compile`` with freezing
  on torchao's converted model (Inductor's own x86 passes);
* qcore int8: ``qcore.lower(..., backend="onednn")`` run eagerly, and
  ``qcore.compile(..., backend="onednn")`` (lowered, then ``torch.compile`` with freezing for
  that model only, so packed weights are constants);

plus the ratio to fp32 eager and the SQNR (dB) of every int8 variant against the float model.

Usage::

    python bench/bench_onednn.py                       # all models, 20 iterations
    python bench/bench_onednn.py --models mlp cnn --iters 5 --no-compile   # quick
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.down = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.down(x) if self.down is not None else x
        return F.relu(self.conv2(F.relu(self.conv1(x))) + identity)


class ResNetStyle(nn.Module):
    """ResNet-18-shaped CNN (batch norm already folded into the convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, 2, 3)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1024, 4096), nn.Linear(4096, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """BERT-base-shaped encoder layer: hidden 768, 12 heads, FFN 3072, GELU, post-LN."""

    def __init__(self, hidden: int = 768, heads: int = 12, ffn: int = 3072) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ff1, self.ff2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, s, self.heads, h // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.ln1(x + self.out(attn.transpose(1, 2).reshape(b, s, h)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


class MobileNetStyle(nn.Module):
    """MobileNet-v2-flavoured: inverted residuals with depthwise convs and ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2, 1)
        blocks, cin = [], 32
        for cout, stride, expand in ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (64, 2, 6), (96, 1, 6), (160, 2, 6)):
            mid = cin * expand
            blocks.append(nn.ModuleDict({
                "expand": nn.Conv2d(cin, mid, 1), "dw": nn.Conv2d(mid, mid, 3, stride, 1, groups=mid),
                "project": nn.Conv2d(mid, cout, 1),
            }))
            blocks[-1].residual = stride == 1 and cin == cout
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, 1280, 1)
        self.fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        for block in self.blocks:
            y = block["project"](F.relu6(block["dw"](F.relu6(block["expand"](x)))))
            x = x + y if block.residual else y
        x = F.relu6(self.head(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "cnn": (ResNetStyle, lambda: (torch.randn(8, 3, 224, 224),)),
    "mlp": (MLP, lambda: (torch.randn(64, 1024),)),
    "bert": (EncoderLayer, lambda: (torch.randn(8, 128, 768),)),
    "mobilenet": (MobileNetStyle, lambda: (torch.randn(8, 3, 224, 224),)),
}


# ----------------------------------------------------------------------------- helpers
def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (reference.float() - actual.float()).pow(2).mean()
    return float("inf") if noise == 0 else float(10 * torch.log10(reference.float().pow(2).mean() / noise))


def latency_ms(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def calibrate(prepared: Any, example: tuple, batches: int) -> None:
    with torch.no_grad():
        for _ in range(batches):
            prepared(*[torch.randn_like(t) for t in example])
        prepared(*example)


def qcore_int8(model: nn.Module, example: tuple, batches: int) -> tuple:
    import qcore
    from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calibrate(prepared, example, batches)
    converted = qcore.convert_pt2e(prepared)
    return converted, qcore.lower(converted, backend="onednn", example_inputs=example)


def torchao_int8(model: nn.Module, example: tuple, batches: int) -> Optional[tuple]:
    try:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        return None
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calibrate(prepared, example, batches)
    converted = convert_pt2e(prepared)
    return converted, lower_pt2e_quantized_to_x86(converted, example)


def run_model(name: str, args: argparse.Namespace) -> list[tuple]:
    torch.manual_seed(0)
    factory, make_example = MODELS[name]
    model, example = factory().eval(), make_example()
    with torch.no_grad():
        reference = model(*example)
    rows: list[tuple] = []

    def measure(label: str, module: Any, freezing: bool = False) -> None:
        # each variant gets its own copy of the inputs: Inductor's x86 passes may accumulate
        # in place into a graph input (seen with torchao's compiled model on the encoder layer)
        inputs = tuple(t.clone() for t in example)
        pristine = tuple(t.clone() for t in example)
        with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
            try:
                out = module(*inputs)
                mutated = any(not torch.equal(a, b) for a, b in zip(inputs, pristine))
                ms = latency_ms(lambda: module(*inputs), args.iters, args.warmup)
            except Exception as exc:  # keep the table going; show what failed
                rows.append((name, label, None, None, f"{type(exc).__name__}: {str(exc)[:80]}"))
                return
        note = "MUTATED ITS INPUT" if mutated else ""
        rows.append((name, label, ms, sqnr(reference, out) if label != "fp32 eager" else None, note))

    measure("fp32 eager", model)
    if args.compile:
        torch._dynamo.reset()
        fp32_compiled = torch.compile(copy.deepcopy(model))
        measure("fp32 compiled", fp32_compiled)
    if not args.skip_torchao:
        # every flow gets its own copy: compiling with freezing may rewrite shared parameters
        peer = torchao_int8(copy.deepcopy(model), example, args.calibration_batches)
        if peer is not None:
            peer_converted, peer_lowered = peer
            measure("torchao int8 lowered eager", peer_lowered)
            if args.compile:
                torch._dynamo.reset()
                peer_compiled = torch.compile(peer_converted)
                measure("torchao int8 compiled (freezing)", peer_compiled, freezing=True)
    converted, lowered = qcore_int8(copy.deepcopy(model), example, args.calibration_batches)
    if args.show_unlowered:
        measure("qcore int8 q/dq (unlowered)", converted)
    measure("qcore int8 lowered eager", lowered)
    if args.compile:
        import qcore

        torch._dynamo.reset()
        # qcore.compile applies the backend's Inductor settings (freezing) to this model only
        ours_compiled = qcore.compile(converted, backend="onednn", example_inputs=example)
        measure("qcore int8 qcore.compile", ours_compiled)
    return rows


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp", "bert", "mobilenet"])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip every torch.compile variant")
    parser.add_argument("--skip-torchao", action="store_true")
    parser.add_argument("--show-unlowered", action="store_true", help="also time qcore's q/dq model before lowering")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, iters {args.iters}")
    header = f"{'model':<10} {'variant':<34} {'ms':>10} {'x fp32':>8} {'SQNR dB':>8}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        rows = run_model(name, args)
        base = rows[0][2]
        for model_name, label, ms, db, note in rows:
            if ms is None:
                print(f"{model_name:<10} {label:<34} {'failed':>10}  {note}")
                continue
            ratio = base / ms if base else float("nan")
            db_text = "" if db is None else f"{db:8.1f}"
            print(f"{model_name:<10} {label:<34} {ms:10.2f} {ratio:8.2f} {db_text:>8}  {note}", flush=True)


if __name__ == "__main__":
    main()
