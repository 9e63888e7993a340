"""Which int8 scheme is exact on this CPU's oneDNN kernels: SQNR of q/dq and lowered, per model.

Not a test. On x86 CPUs without VNNI (AVX2 only) oneDNN's u8 x s8 kernels add pairs of products
in int16 with saturation, so a program with full-range uint8 activations [0, 255] and int8
weights [-128, 127] loses accuracy once lowered; with VNNI or AMX every scheme is exact. For
each model (random weights, fixed seed; 8 random calibration batches; SQNR against the float
model on a held-out batch) it prints, on the running CPU, the SQNR (dB) of the q/dq program
(``convert_pt2e``) and of the lowered one (``qcore.lower(..., backend="onednn")``) for each
candidate scheme (uint8 activations x int8 per-channel weights):

* ``8-bit x 8-bit``, [0, 255] x [-128, 127]:
  ``get_default_x86_inductor_quantization_config(target="avx512_vnni")``, the full 8-bit
  recipe (torchao's default); not exact without VNNI;
* ``7-bit activations``, [0, 127] x [-128, 127]: ``reduce_range=True``;
* ``7-bit weights``, [0, 255] x [-64, 63] (2 * 255 * 64 <= 32767);
* ``half a bit off each``, [0, 180] x [-91, 91] (2 * 180 * 91 = 32760);
* torchao 0.18's default ``X86InductorQuantizer``, q/dq and ``lower_pt2e_quantized_to_x86``
  (left out when torchao is not importable).

The last three are exact on every CPU; the output says which one ``qcore.quantize`` uses here.

Then the issue's must-show table: qcore's default for this CPU (``qcore.quantize(model, x,
backend="onednn", calibration=...)``) against torchao's default, with two checks per model:
lowered >= its own q/dq - 0.5 dB, and qcore q/dq >= torchao q/dq - 6 dB.

Last, the exact full-8-bit path for a CPU without VNNI: each int8 weight split as
``w = 2 * hi + lo`` (``hi = floor(w / 2)`` in [-64, 63], ``lo`` in {0, 1}), two oneDNN int8 GEMMs
with fp32 output (weight scales ``2 s`` and ``s``) added, timed against one int8 GEMM and fp32
``F.linear`` on a few GEMM shapes: ratios of medians, interleaved rounds, so that a busy spell
on a shared machine hits all three alike.

Usage::

    python bench/bench_int8_schemes.py                       # all models, 3 GEMM shapes
    python bench/bench_int8_schemes.py --quick               # fewer rounds, one GEMM shape
    python bench/bench_int8_schemes.py --threads 1 --rounds 30 --markdown /tmp/int8_schemes.md
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the models of the issue's must-show list (the other two are the single layers)
MUST_SHOW = ("mlp", "conv_bn_cnn", "conv1d_stack", "transformer_encoder_layer")
#: lowered may lose at most this much against its own q/dq program (dB)
LOWERING_SLACK_DB = 0.5
#: qcore's q/dq may lose at most this much against torchao's default q/dq program (dB)
PEER_SLACK_DB = 6.0


# ----------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class ConvBnCNN(nn.Module):
    """Conv+BN+ReLU blocks, one residual add, average pooling and a linear head (eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.block1 = conv_bn_relu(16, 16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.down = conv_bn_relu(16, 32, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.bn2(self.conv2(self.block1(x))) + x)  # residual add
        x = self.down(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv1d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv1d(32, 16, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def randomize_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters for every BatchNorm (eval mode)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.25)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)


@dataclass(frozen=True)
class ModelCase:
    name: str
    title: str
    make: Callable[[], nn.Module]
    input_shape: tuple


MODELS = (
    ModelCase("linear", "Linear(64, 64)", lambda: nn.Linear(64, 64), (16, 64)),
    ModelCase("conv_relu", "Conv2d(16, 32, 3) + ReLU", lambda: nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU()), (2, 16, 16, 16)),
    ModelCase("mlp", "MLP 64-256-256-10", MLP, (16, 64)),
    ModelCase("conv_bn_cnn", "conv-bn CNN (residual)", ConvBnCNN, (2, 3, 32, 32)),
    ModelCase("conv1d_stack", "Conv1d stack", Conv1dStack, (4, 16, 64)),
    ModelCase(
        "transformer_encoder_layer", "TransformerEncoderLayer(64, 4, 128)",
        lambda: nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True),
        (2, 16, 64),
    ),
)


def build_case(case: ModelCase, calibration_batches: int, seed: int = 0) -> tuple[nn.Module, tuple, list, tuple]:
    """(eval model, example inputs, calibration batches, held-out batch), all from ``seed``."""
    torch.manual_seed(seed)
    model = case.make().eval()
    g = torch.Generator().manual_seed(seed + 1)
    randomize_batch_norm(model, g)
    draw = lambda: (torch.randn(case.input_shape, generator=g),)  # noqa: E731
    example = draw()
    calibration = [draw() for _ in range(calibration_batches)]
    return model, example, calibration, draw()


# ----------------------------------------------------------------------------- flows
def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    from qcore.app.report import sqnr_db as qcore_sqnr

    return qcore_sqnr(reference, actual)


@dataclass(frozen=True)
class Scheme:
    """One candidate: activations uint8 [0, act_max], weights int8 [weight_min, weight_max];
    ``reduce_range``: built with ``reduce_range=True`` (the user's knob for [0, 127]), else the
    full 8-bit config (``target="avx512_vnni"``) with these ranges put in."""

    label: str
    short: str
    act_max: int
    weight_min: int
    weight_max: int
    reduce_range: bool = False

    @property
    def exact_without_vnni(self) -> bool:
        from qcore_onednn_x86.cpu_features import pair_sum_is_exact

        return pair_sum_is_exact(self.act_max, max(-self.weight_min, self.weight_max))

    @property
    def ranges(self) -> str:
        return f"[0, {self.act_max}] x [{self.weight_min}, {self.weight_max}]"

    def config(self) -> Any:
        import attrs
        from qcore_onednn_x86 import get_default_x86_inductor_quantization_config

        if self.reduce_range:
            config = get_default_x86_inductor_quantization_config(reduce_range=True)
        else:
            config = get_default_x86_inductor_quantization_config(target="avx512_vnni")
            activation = attrs.evolve(config.input_activation, quant_max=self.act_max)
            weight = attrs.evolve(config.weight, quant_min=self.weight_min, quant_max=self.weight_max)
            config = attrs.evolve(config, input_activation=activation, output_activation=activation, weight=weight)
        assert (config.input_activation.quant_max, config.weight.quant_min, config.weight.quant_max) == (
            self.act_max, self.weight_min, self.weight_max,
        ), f"{self.label}: the config's ranges are not {self.ranges}"
        return config


SCHEMES = (
    Scheme("8-bit x 8-bit", "8x8", 255, -128, 127),
    Scheme("7-bit activations", "act7", 127, -128, 127, reduce_range=True),
    Scheme("7-bit weights", "w7", 255, -64, 63),
    Scheme("half a bit off each", "a180w91", 180, -91, 91),
)


@dataclass
class Result:
    qdq_db: float
    lowered_db: Optional[float]
    error: str = ""


def run_quietly(fn: Callable[[], Any]) -> Any:
    """``fn()`` with library warnings silenced (the saturation warning of a full 8-bit program
    lowered on AVX2 is the point of the table, not news); no autograd."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return fn()


def evaluate(converted: Any, lower: Callable[[Any], Any], reference: torch.Tensor, held_out: tuple) -> Result:
    qdq = sqnr_db(reference, converted(*held_out))
    try:
        lowered = lower(converted)
        lowered_db = sqnr_db(reference, lowered(*held_out))
    except Exception as exc:  # keep the table going; show what failed
        return Result(qdq, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
    return Result(qdq, lowered_db)


def qcore_scheme(model: nn.Module, example: tuple, calibration: list, held_out: tuple, reference: torch.Tensor, scheme: Scheme) -> Result:
    import qcore
    from qcore_onednn_x86 import X86InductorQuantizer

    def flow() -> Result:
        quantizer = X86InductorQuantizer().set_global(scheme.config())
        prepared = qcore.prepare_pt2e(torch.export.export(copy.deepcopy(model), example).module(), quantizer)
        for batch in calibration:
            prepared(*batch)
        converted = qcore.convert_pt2e(prepared)
        return evaluate(converted, lambda c: qcore.lower(c, backend="onednn", example_inputs=example), reference, held_out)

    return run_quietly(flow)


def qcore_default(model: nn.Module, example: tuple, calibration: list, held_out: tuple, reference: torch.Tensor) -> Result:
    """What a user gets: ``qcore.quantize(model, x, backend="onednn", calibration=...)``."""
    import qcore

    def flow() -> Result:
        result = qcore.quantize(copy.deepcopy(model), example, backend="onednn", calibration=calibration, measure_latency=False)
        return Result(sqnr_db(reference, result.converted(*held_out)), sqnr_db(reference, result.lowered(*held_out)))

    return run_quietly(flow)


def torchao_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.pt2e.lowering  # noqa: F401
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    except ImportError:
        return False
    return True


def torchao_default(model: nn.Module, example: tuple, calibration: list, held_out: tuple, reference: torch.Tensor) -> Result:
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    def flow() -> Result:
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(torch.export.export(copy.deepcopy(model), example).module(), quantizer)
        for batch in calibration:
            prepared(*batch)
        converted = convert_pt2e(prepared)
        return evaluate(converted, lambda c: lower_pt2e_quantized_to_x86(copy.deepcopy(c), example), reference, held_out)

    return run_quietly(flow)


@dataclass
class ModelRow:
    case: ModelCase
    schemes: dict = field(default_factory=dict)  # Scheme.short -> Result
    default: Optional[Result] = None
    torchao: Optional[Result] = None


def measure_models(cases: tuple, calibration_batches: int, with_torchao: bool, seed: int = 0) -> list[ModelRow]:
    rows = []
    for case in cases:
        model, example, calibration, held_out = build_case(case, calibration_batches, seed)
        with torch.no_grad():
            reference = model(*held_out)
        row = ModelRow(case)
        for scheme in SCHEMES:
            row.schemes[scheme.short] = qcore_scheme(model, example, calibration, held_out, reference, scheme)
        row.default = qcore_default(model, example, calibration, held_out, reference)
        if with_torchao:
            row.torchao = torchao_default(model, example, calibration, held_out, reference)
        rows.append(row)
        print(f"  measured {case.title}", file=sys.stderr, flush=True)
    return rows


def default_ranges() -> tuple[int, int, int]:
    """(activation max, weight min, weight max) of qcore's default config for this CPU."""
    from qcore_onednn_x86 import X86InductorQuantizer

    config = X86InductorQuantizer.default_config()
    return config.input_activation.quant_max, config.weight.quant_min, config.weight.quant_max


def default_scheme_label() -> str:
    """Which of :data:`SCHEMES` ``qcore.quantize`` picks on this CPU (by its default config's ranges)."""
    act_max, weight_min, weight_max = default_ranges()
    for scheme in SCHEMES:
        if (scheme.act_max, scheme.weight_min, scheme.weight_max) == (act_max, weight_min, weight_max):
            return f"{scheme.label}, {scheme.ranges}"
    return f"[0, {act_max}] x [{weight_min}, {weight_max}] (not one of the candidates)"


# ----------------------------------------------------------------------------- GEMM timing
@dataclass(frozen=True)
class GemmPaths:
    """fp32 ``F.linear``, one oneDNN int8 GEMM, and the exact split (two int8 GEMMs added) on
    the same quantized operands; ``exact`` is the fp32 product of the dequantized operands."""

    fp32: Callable[[], torch.Tensor]
    int8: Callable[[], torch.Tensor]
    split: Callable[[], torch.Tensor]
    exact: torch.Tensor


def split_int8_weight(qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qw = 2 * hi + lo`` with ``hi = floor(qw / 2)`` in [-64, 63] and ``lo`` in {0, 1}.

    >>> hi, lo = split_int8_weight(torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8))
    >>> hi.tolist(), lo.tolist()
    ([-64, -1, 0, 0, 63], [0, 1, 0, 1, 1])
    """
    hi = torch.div(qw, 2, rounding_mode="floor").to(torch.int8)
    return hi, (qw - 2 * hi).to(torch.int8)


def gemm_paths(m: int, k: int, n: int, seed: int = 0) -> GemmPaths:
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    x_scale = float(x.max() - x.min()) / 255
    x_zero = int(round(-float(x.min()) / x_scale))
    qx = torch.clamp(torch.round(x / x_scale) + x_zero, 0, 255).to(torch.uint8)
    w_scale = w.abs().amax(1) / 127
    qw = torch.clamp(torch.round(w / w_scale[:, None]), -128, 127).to(torch.int8)
    exact = ((qx.float() - x_zero) * x_scale) @ (qw.float() * w_scale[:, None]).t() + b
    onednn = torch.ops.onednn
    zeros = torch.zeros(n, dtype=torch.long)

    def int8_gemm(weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> Callable[[], torch.Tensor]:
        packed = onednn.qlinear_prepack(weight, [m, k])
        return lambda: onednn.qlinear_pointwise(
            qx, x_scale, x_zero, packed, scale, zeros, bias, 1.0, 0, torch.float32, "none", [], ""
        )

    hi, lo = split_int8_weight(qw)
    high, low = int8_gemm(hi, w_scale * 2, b), int8_gemm(lo, w_scale, None)
    return GemmPaths(
        fp32=lambda: F.linear(x, w, b), int8=int8_gemm(qw, w_scale, b), split=lambda: high() + low(), exact=exact,
    )


def time_gemms(shapes: list, rounds: int, inner: int) -> list[dict]:
    """Per shape: SQNR of int8 and split against the exact int8 product, and median ms and
    median per-round ratios of the three paths timed interleaved (order rotated each round)."""
    out = []
    with torch.no_grad():
        for m, k, n in shapes:
            paths = gemm_paths(m, k, n)
            variants = {"fp32": paths.fp32, "int8": paths.int8, "split": paths.split}
            for fn in variants.values():
                for _ in range(3):
                    fn()
            samples: dict = {name: [] for name in variants}
            names = list(variants)
            for r in range(rounds):
                for name in names[r % 3:] + names[: r % 3]:
                    start = time.perf_counter()
                    for _ in range(inner):
                        variants[name]()
                    samples[name].append((time.perf_counter() - start) * 1e3 / inner)

            def ratio(a: str, b: str) -> float:
                return statistics.median(x / y for x, y in zip(samples[a], samples[b]))

            out.append({
                "shape": (m, k, n),
                "int8_db": sqnr_db(paths.exact, paths.int8()),
                "split_db": sqnr_db(paths.exact, paths.split()),
                "ms": {name: statistics.median(s) for name, s in samples.items()},
                "split/int8": ratio("split", "int8"),
                "split/fp32": ratio("split", "fp32"),
                "int8/fp32": ratio("int8", "fp32"),
            })
            print(f"  timed GEMM {m}x{k}x{n}", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- tables
def db(value: Optional[float]) -> str:
    if value is None:
        return "failed"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def markdown_table(header: list, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def must_show_checks(row: ModelRow) -> tuple[bool, bool]:
    """(lowered >= own q/dq - 0.5 dB, qcore q/dq >= torchao q/dq - 6 dB; True without torchao)."""
    d = row.default
    lowering_ok = d.lowered_db is not None and d.lowered_db >= d.qdq_db - LOWERING_SLACK_DB
    peer_ok = row.torchao is None or d.qdq_db >= row.torchao.qdq_db - PEER_SLACK_DB
    return lowering_ok, peer_ok


def render(cpu_line: str, default_label: str, rows: list, gemms: list, with_torchao: bool, args: argparse.Namespace) -> str:
    lines = [
        f"CPU: {cpu_line}",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, seed {args.seed}; qcore's default scheme on this CPU: {default_label}",
        "",
        "SQNR (dB) against the float model on a held-out batch, q/dq program / lowered (oneDNN):",
        "",
    ]
    default = default_ranges()
    header = ["model"] + [
        f"{s.label} {s.ranges}{' (default here)' if (s.act_max, s.weight_min, s.weight_max) == default else ''}"
        f"{'' if s.exact_without_vnni else ' (inexact without VNNI)'}" for s in SCHEMES
    ]
    if with_torchao:
        header.append("torchao default q/dq / lowered")
    table = []
    for row in rows:
        cells = [row.case.title]
        for s in SCHEMES:
            r = row.schemes[s.short]
            cells.append(f"{db(r.qdq_db)} / {db(r.lowered_db)}")
        if with_torchao:
            cells.append(f"{db(row.torchao.qdq_db)} / {db(row.torchao.lowered_db)}")
        table.append(cells)
    lines += markdown_table(header, table)
    failures = [(row.case.title, label, r.error) for row in rows for label, r in
                list(row.schemes.items()) + [("default", row.default), ("torchao", row.torchao)] if r is not None and r.error]
    for title, label, error in failures:
        lines.append(f"  lowering failed: {title}, {label}: {error}")

    lines += [
        "",
        f"Must-show: qcore.quantize(model, x, backend=\"onednn\", calibration=...) ({default_label} here) "
        f"vs torchao's default; checks: lowered >= own q/dq - {LOWERING_SLACK_DB} dB, qcore q/dq >= torchao q/dq - {PEER_SLACK_DB:g} dB",
        "",
    ]
    header = ["model", "qcore q/dq", "qcore lowered", "torchao q/dq", "torchao lowered", "lowered vs q/dq", "vs torchao q/dq"]
    table, all_ok = [], True
    for row in rows:
        if row.case.name not in MUST_SHOW:
            continue
        lowering_ok, peer_ok = must_show_checks(row)
        all_ok = all_ok and lowering_ok and peer_ok
        d, t = row.default, row.torchao
        table.append([
            row.case.title, db(d.qdq_db), db(d.lowered_db),
            db(t.qdq_db) if t else "n/a", db(t.lowered_db) if t else "n/a",
            f"{'met' if lowering_ok else 'NOT met'} ({(d.lowered_db or -math.inf) - d.qdq_db:+.2f})",
            f"{'met' if peer_ok else 'NOT met'} ({d.qdq_db - t.qdq_db:+.1f})" if t else "n/a (no torchao)",
        ])
    lines += markdown_table(header, table)
    lines.append(f"  every must-show criterion: {'met' if all_ok else 'NOT met'}")

    if gemms:
        lines += [
            "",
            f"Exact full-8-bit split GEMM (w = 2*hi + lo, two oneDNN int8 GEMMs added) vs one int8 GEMM vs fp32 "
            f"F.linear: {args.rounds} interleaved rounds, ratios = median of per-round ratios; SQNR against the exact int8 product",
            "",
        ]
        header = ["M x K x N", "fp32 ms", "int8 ms", "split ms", "split / int8", "split / fp32", "int8 / fp32", "int8 SQNR dB", "split SQNR dB"]
        lines += markdown_table(header, [[
            "x".join(map(str, g["shape"])), f"{g['ms']['fp32']:.3f}", f"{g['ms']['int8']:.3f}", f"{g['ms']['split']:.3f}",
            f"{g['split/int8']:.2f}", f"{g['split/fp32']:.2f}", f"{g['int8/fp32']:.2f}", db(g["int8_db"]), db(g["split_db"]),
        ] for g in gemms])
    return "\n".join(lines) + "\n"


#: (M, K, N) of the timed GEMMs: the bench MLP's first layer, a BERT FFN layer, a small square one
GEMM_SHAPES = [(64, 1024, 1024), (128, 768, 3072), (16, 256, 256)]


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per GEMM shape (default 15)")
    parser.add_argument("--inner", type=int, default=10, help="calls per path per round (a sample is their mean)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, one GEMM shape")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="weights and data (the README's figures: 0; also tried 10, 20, 30)")
    parser.add_argument("--models", nargs="+", choices=[c.name for c in MODELS], default=[c.name for c in MODELS])
    parser.add_argument("--no-gemm", dest="gemm", action="store_false", help="skip the split-GEMM timing")
    parser.add_argument("--skip-torchao", action="store_true", help="qcore only")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds = min(args.rounds, 5)
    from qcore_onednn_x86.cpu_features import detect_cpu

    cpu_line = detect_cpu().describe()
    print(f"CPU: {cpu_line}", file=sys.stderr, flush=True)
    with_torchao = not args.skip_torchao and torchao_available()
    cases = tuple(c for c in MODELS if c.name in args.models)
    rows = measure_models(cases, args.calibration_batches, with_torchao, args.seed)
    gemms = time_gemms(GEMM_SHAPES[:1] if args.quick else GEMM_SHAPES, args.rounds, args.inner) if args.gemm else []
    text = render(cpu_line, default_scheme_label(), rows, gemms, with_torchao, args)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
