"""Benchmark: fp32 vs torchao int8 vs qcore int8 (oneDNN) on four CPU models, side by side.

Not a test. For each model it builds every variant first:

* fp32 eager, fp32 ``torch.compile``;
* torchao int8: ``lower_pt2e_quantized_to_x86`` (eager), and ``torch.compile`` of torchao's
  converted model with Inductor freezing (Inductor's own x86 passes);
* qcore int8: ``qcore.lower(..., backend="onednn")`` run eagerly, and
  ``qcore.compile(..., backend="onednn")``;

then times them interleaved: ``--repeat`` rounds, each round runs every variant once (``--inner``
calls per sample, the variant order rotated from round to round), so that a busy spell on a
shared machine hits all variants alike. It prints per model the median latency, the speed-up
over fp32 eager and fp32 compiled, the SQNR (dB) against the float model, and the issue's
targets with the median of the per-round ratios. Each variant gets its own input tensors
(torchao's compiled encoder layer writes into its input); a variant that mutates its input is
flagged. Without torchao the torchao rows are left out. The header names the CPU and the int8
ranges of qcore's config: made for this CPU (narrower ranges on a CPU without VNNI, where oneDNN's
full 8-bit kernels saturate; ``bench/bench_int8_schemes.py``) unless ``--target`` names another.

Usage::

    python bench/bench_onednn.py --threads 1 --repeat 30            # all models
    python bench/bench_onednn.py --models mlp cnn --repeat 10 --no-compile   # quick
    python bench/bench_onednn.py --models mlp bert --torchao-autotune        # + torchao autotuned
    python bench/bench_onednn.py --target avx512_vnni     # qcore's full 8-bit config on any CPU
    python bench/bench_onednn.py --also-target avx512_vnni --skip-torchao   # + that config beside the default
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
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


def calibration_batches(example: tuple, batches: int) -> list[tuple]:
    """``batches`` random batches shaped like ``example``, then ``example``: drawn once, so that
    every flow calibrates on the same data (their SQNRs are comparable only then)."""
    g = torch.Generator().manual_seed(1234)
    drawn = [tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in example) for _ in range(batches)]
    return drawn + [example]


def calibrate(prepared: Any, batches: list[tuple]) -> None:
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)


def qcore_config(target: Optional[str] = None) -> Any:
    """qcore's default x86 config for ``target`` (None: this CPU; narrower ranges without VNNI)."""
    from qcore_onednn_x86 import get_default_x86_inductor_quantization_config

    return get_default_x86_inductor_quantization_config(target=target)


def scheme_line(target: Optional[str] = None) -> str:
    """The CPU this runs on and the int8 ranges qcore's variants use, e.g. for the table header."""
    from qcore_onednn_x86.cpu_features import detect_cpu

    config = qcore_config(target)
    act, weight = config.input_activation, config.weight
    made_for = "this CPU" if target is None else f"target {target!r}"
    return (
        f"CPU: {detect_cpu().describe()}\n"
        f"qcore scheme ({made_for}): activations uint8 [{act.quant_min}, {act.quant_max}] x "
        f"weights int8 [{weight.quant_min}, {weight.quant_max}]; torchao: its default, [0, 255] x [-128, 127]"
    )


def qcore_converted(model: nn.Module, example: tuple, batches: list[tuple], target: Optional[str] = None) -> Any:
    import qcore
    from qcore_onednn_x86 import X86InductorQuantizer

    quantizer = X86InductorQuantizer().set_global(qcore_config(target))
    prepared = qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calibrate(prepared, batches)
    return qcore.convert_pt2e(prepared)


def torchao_converted(model: nn.Module, example: tuple, batches: list[tuple]) -> Any:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    calibrate(prepared, batches)
    return convert_pt2e(prepared)


def torchao_available() -> bool:
    try:
        import torchao.quantization.pt2e.lowering  # noqa: F401
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError:
        return False
    return True


#: the Inductor settings of torchao's extra "+tune" row: the same GEMM autotuning qcore.compile's
#: oneDNN backend turns on (each int8 GEMM runs the faster of oneDNN's and Inductor's kernel)
AUTOTUNE = {"max_autotune": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}


@dataclass
class Variant:
    """One way of running a model: its callable, its own inputs, and what was measured."""

    label: str
    run: Callable[..., Any]
    inputs: tuple
    samples: list = field(default_factory=list)
    sqnr_db: Optional[float] = None
    note: str = ""

    def __call__(self) -> Any:
        return self.run(*self.inputs)

    @property
    def median_ms(self) -> Optional[float]:
        return statistics.median(self.samples) if self.samples else None


def build_variants(name: str, args: argparse.Namespace) -> tuple[list[Variant], list[tuple[str, str]]]:
    """Every variant of model ``name``, each called once (compiled now) and checked against float.

    Returns the variants that ran and (label, error) for those that failed.
    """
    import qcore

    torch.manual_seed(0)
    factory, make_example = MODELS[name]
    model, example = factory().eval(), make_example()
    with torch.no_grad():
        reference = model(*example)
    torch._dynamo.reset()
    calibration = calibration_batches(example, args.calibration_batches)

    # (label, builder returning the callable, Inductor freezing while built); builders run lazily so
    # a failure costs one row, not the model
    plan: list[tuple[str, Callable[[], Callable], bool]] = [("fp32 eager", lambda: model, False)]
    if args.compile:
        plan.append(("fp32 compiled", lambda: torch.compile(copy.deepcopy(model)), False))
    if args.torchao:
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        # every flow quantizes its own copy: compiling with freezing may rewrite shared parameters
        peer = torchao_converted(copy.deepcopy(model), example, calibration)
        plan.append(("torchao int8 lowered eager", lambda: lower_pt2e_quantized_to_x86(copy.deepcopy(peer), example), False))
        if args.compile and args.torchao_autotune:  # torchao's recipe plus the GEMM autotuning qcore.compile does
            tuned_peer = copy.deepcopy(peer)
            plan.append(("torchao int8 compiled+tune", lambda: torch.compile(tuned_peer, options=AUTOTUNE), True))
        if args.compile:
            plan.append(("torchao int8 compiled", lambda: torch.compile(peer), True))
    ours = qcore_converted(copy.deepcopy(model), example, calibration, args.target)
    plan.append(("qcore int8 lowered eager", lambda: qcore.lower(ours, backend="onednn", example_inputs=example), False))
    if args.compile:
        plan.append(("qcore int8 compiled", lambda: qcore.compile(ours, backend="onednn", example_inputs=example), False))
    if args.also_target:  # the same model quantized for another CPU, timed beside (same kernels, other ranges)
        other = qcore_converted(copy.deepcopy(model), example, calibration, args.also_target)
        tag = f"qcore [{args.also_target}]"
        plan.append((f"{tag} lowered", lambda: qcore.lower(other, backend="onednn", example_inputs=example), False))
        if args.compile:
            plan.append((f"{tag} compiled", lambda: qcore.compile(other, backend="onednn", example_inputs=example), False))

    variants, failures = [], []
    for label, build, freezing in plan:
        inputs = tuple(t.clone() for t in example)
        variant = Variant(label, None, inputs)  # type: ignore[arg-type]
        try:
            # torchao's compiled model: freezing on while Dynamo and Inductor compile it (its
            # first call), as a user would set it; later calls run the cached code untouched
            with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
                variant.run = build()
                out = variant()
        except Exception as exc:  # keep the table going; show what failed (the traceback on stderr)
            traceback.print_exc(file=sys.stderr)
            failures.append((label, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
            continue
        if label != "fp32 eager":
            variant.sqnr_db = sqnr(reference, out)
        if any(not torch.equal(a, b) for a, b in zip(inputs, example)):
            variant.note = "mutated its input"
            variant.inputs = tuple(t.clone() for t in example)
        variants.append(variant)
    return variants, failures


def time_interleaved(variants: list[Variant], repeat: int, inner: int, warmup: int) -> list[dict]:
    """Fill each variant's samples (ms per call); returns, per round, label -> ms."""
    rounds: list[dict] = []
    with torch.no_grad():
        for variant in variants:
            for _ in range(warmup):
                variant()
        for r in range(repeat):
            shift = r % len(variants)
            this_round = {}
            for variant in variants[shift:] + variants[:shift]:
                start = time.perf_counter()
                for _ in range(inner):
                    variant()
                ms = (time.perf_counter() - start) * 1e3 / inner
                variant.samples.append(ms)
                this_round[variant.label] = ms
            rounds.append(this_round)
    return rounds


def per_round_ratios(rounds: list[dict], numerator: str, denominator: str) -> list[float]:
    """numerator_ms / denominator_ms of every round that timed both."""
    return [r[numerator] / r[denominator] for r in rounds if numerator in r and denominator in r]


def paired_ratio(rounds: list[dict], numerator: str, denominator: str) -> Optional[float]:
    """Median over rounds of numerator_ms / denominator_ms (both timed in the same round)."""
    ratios = per_round_ratios(rounds, numerator, denominator)
    return statistics.median(ratios) if ratios else None


def median_interval(rounds: list[dict], numerator: str, denominator: str, resamples: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of :func:`paired_ratio` (rounds resampled with replacement, seeded):
    how far the median ratio could move with other rounds on this machine."""
    import random

    ratios = per_round_ratios(rounds, numerator, denominator)
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


TARGETS = (
    # (text, numerator, denominator, met if ratio <= limit (None: no target), models it applies to)
    ("qcore compiled / torchao compiled", "qcore int8 compiled", "torchao int8 compiled", 1.0, None),
    ("qcore lowered eager / torchao lowered eager", "qcore int8 lowered eager", "torchao int8 lowered eager", 1.0, None),
    ("qcore compiled / fp32 compiled (need <= 1/3)", "qcore int8 compiled", "fp32 compiled", 1 / 3, ("cnn", "mlp")),
    # not a target (limit None): torchao's compiled model with the same autotuning, --torchao-autotune
    ("qcore compiled / torchao compiled+tune", "qcore int8 compiled", "torchao int8 compiled+tune", None, None),
)


def report(name: str, variants: list[Variant], failures: list, rounds: list[dict], also_target: Optional[str] = None) -> None:
    medians = {v.label: v.median_ms for v in variants}
    eager, compiled = medians.get("fp32 eager"), medians.get("fp32 compiled")
    header = f"{'variant':<28} {'median ms':>10} {'IQR ms':>9} {'x eager':>8} {'x fp32 compiled':>16} {'SQNR dB':>8}"
    print(f"\n== {name}: {len(rounds)} interleaved rounds")
    print(header)
    print("-" * len(header))
    for v in variants:
        ms = v.median_ms
        q = statistics.quantiles(v.samples, n=4) if len(v.samples) >= 2 else [ms, ms, ms]
        speed_eager = f"{eager / ms:8.2f}" if eager else ""
        speed_compiled = f"{compiled / ms:16.2f}" if compiled else f"{'':>16}"
        db = "" if v.sqnr_db is None else f"{v.sqnr_db:8.1f}"
        print(f"{v.label:<28} {ms:10.3f} {q[2] - q[0]:9.3f} {speed_eager} {speed_compiled} {db:>8}  {v.note}")
    for label, error in failures:
        print(f"{label:<28} {'failed':>10}  {error}")
    extra = ()
    if also_target:
        tag = f"qcore [{also_target}]"
        extra = (
            (f"qcore lowered eager / {tag} lowered", "qcore int8 lowered eager", f"{tag} lowered", None, None),
            (f"qcore compiled / {tag} compiled", "qcore int8 compiled", f"{tag} compiled", None, None),
        )
    for text, numerator, denominator, limit, models in TARGETS + extra:
        if models is not None and name not in models:
            continue
        ratio = paired_ratio(rounds, numerator, denominator)
        if ratio is None:
            continue
        low, high = median_interval(rounds, numerator, denominator)
        print(
            f"  {'ratio' if limit is None else 'target'} {text}: {ratio:.3f} (median of per-round ratios; 95% interval {low:.3f}-{high:.3f})"
            f" -> {'for information' if limit is None else 'met' if ratio <= limit else 'NOT met'}"
        )
    ours = next((v.sqnr_db for v in variants if v.label == "qcore int8 lowered eager"), None)
    peer = next((v.sqnr_db for v in variants if v.label == "torchao int8 lowered eager"), None)
    if ours is not None and peer is not None:
        print(f"  target SQNR qcore >= torchao: {ours:.2f} vs {peer:.2f} dB -> {'met' if ours >= peer else 'NOT met'}")


def main(argv: Optional[list] = None) -> None:
    from qcore_onednn_x86.cpu_features import TARGET_CPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp", "bert", "mobilenet"])
    parser.add_argument("--repeat", "--iters", type=int, default=20, help="interleaved rounds (medians over them)")
    parser.add_argument("--inner", type=int, default=1, help="calls per variant per round (a sample is their mean)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per variant after compiling")
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip every torch.compile variant")
    parser.add_argument("--skip-torchao", action="store_true", help="qcore and fp32 only")
    parser.add_argument(
        "--torchao-autotune", action="store_true",
        help="also time torchao's compiled model with the GEMM autotuning qcore.compile turns on",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--target", choices=TARGET_CPUS, default=None,
        help="the CPU qcore's config is made for (default: this one; without VNNI, narrower ranges)",
    )
    parser.add_argument(
        "--also-target", choices=TARGET_CPUS, default=None,
        help="also time qcore's model quantized for this CPU (e.g. avx512_vnni: full 8-bit ranges), side by side",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.torchao = not args.skip_torchao and torchao_available()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeat {args.repeat}, inner {args.inner}, "
        f"torchao {'yes' if args.torchao else 'no (qcore and fp32 only)'}"
    )
    print(scheme_line(args.target))
    for name in args.models:
        variants, failures = build_variants(name, args)
        rounds = time_interleaved(variants, args.repeat, args.inner, args.warmup)
        report(name, variants, failures, rounds, args.also_target)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
