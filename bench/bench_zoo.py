"""Benchmark: public architectures through qcore and torchao side by side, each in its own process.

Not a test. Models nobody here wrote: torchvision classification nets and ``transformers``
architectures built from small configs (random init, seed 0, batch 1; no download). For each
model, backend (``x86``: the default ``X86InductorQuantizer`` config of each implementation;
``xnnpack``: per-channel symmetric) and implementation (qcore, torchao 0.18.0), a child process
(``--worker``) builds the model, re-estimates its batch-norm statistics on the calibration data
(random-init nets are degenerate otherwise), exports it, prepares, calibrates on 4 batches,
converts and measures:

* ok / the error (first line);
* q/dq ops after convert (quantize/dequantize of ``quantized_decomposed``);
* int8 share: of the conv / linear / addmm / constant-weight matmul ops of the float graph (a
  weight computed from constants, as weight norm makes, counts), how many run as int8 kernels
  (x86: neither an aten op with a constant weight, float or dequantized, nor an fp32 oneDNN/MKL
  kernel is left for them after lowering; xnnpack, not lowered here: their weight comes from a
  dequantize);
* SQNR (dB) vs float of the q/dq model and (x86) of the lowered model (qcore: ``qcore.lower``;
  torchao: ``lower_pt2e_quantized_to_x86``), on 2 evaluation batches;
* prepare + convert time (export and calibration excluded);
* with ``--latency``: eager fp32 and lowered int8 latency (x86); with ``--compile`` also
  ``torch.compile`` fp32 and compiled int8 (``qcore.compile``; torchao: ``torch.compile`` of its
  converted model with Inductor freezing).

It prints a table (qcore beside torchao, and the ratio of their prepare + convert times) and
writes every record as JSON (``--json``). A child that exceeds ``--timeout`` seconds is an error.

torchvision: the build on the package index is a CUDA one whose C ops do not load beside torch
2.13 CPU (``import torchvision`` fails with ``operator torchvision::nms does not exist``). The
classification models use none of those ops: ``import_torchvision`` pre-registers empty
``torchvision._meta_registrations`` and ``torchvision._autograd_registrations`` modules in
``sys.modules`` before importing it. Install it without dependencies (``pip install --no-deps
torchvision``: it would otherwise replace torch). Models whose package is missing are reported
as errors, not skipped silently.

Usage::

    python bench/bench_zoo.py                                   # every model, both backends
    python bench/bench_zoo.py --models gpt2 bert --backends x86
    python bench/bench_zoo.py --models resnet18 --latency --compile --json /tmp/zoo.json
    tox -e zoo -- --models gpt2 t5_encoder llama
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from typing import Any, Callable, Optional

import torch

RESULT_PREFIX = "ZOO_RESULT "
VOCAB, SEQ = 128, 16
CALIBRATION_BATCHES, EVAL_BATCHES = 4, 2


# ----------------------------------------------------------------------------- models
def import_torchvision() -> Any:
    """``import torchvision``; if its C ops do not load, again with their registrations stubbed
    out (see the module docstring). ``transformers`` imports torchvision when it is installed, so
    the worker calls this before building any model."""
    try:
        import torchvision
    except RuntimeError:  # "operator torchvision::nms does not exist"
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision
    return torchvision


def _vision(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        return getattr(import_torchvision().models, name)()

    return build


class _Tokens(torch.nn.Module):
    """``input_ids -> last hidden state`` for a ``transformers`` model (no cache, tuples)."""

    def __init__(self, model: torch.nn.Module, use_cache: bool) -> None:
        super().__init__()
        self.model, self.use_cache = model, use_cache

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": False} if self.use_cache else {}
        return self.model(input_ids=input_ids, return_dict=False, **kwargs)[0]


class _Features(torch.nn.Module):
    """``pixel_values`` / ``input_values`` -> last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, return_dict=False)[0]


SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return _Tokens(BertModel(BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **SMALL)), False)


def _distilbert() -> torch.nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=VOCAB, n_layers=2, dim=64, hidden_dim=128, n_heads=4, max_position_embeddings=64)
    return _Tokens(DistilBertModel(config), False)


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    return _Tokens(GPT2Model(config), True)


def _t5_encoder() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=VOCAB,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return _Tokens(T5EncoderModel(config), False)


def _llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, num_key_value_heads=4, bos_token_id=0, eos_token_id=0, **SMALL)
    return _Tokens(LlamaModel(config), True)


def _hf_vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    return _Features(ViTModel(ViTConfig(image_size=32, patch_size=8, **SMALL)))


def _wav2vec2() -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, **SMALL)
    return _Features(Wav2Vec2Model(config))


def _image(size: int = 224) -> Callable[[torch.Generator], tuple]:
    return lambda g: (torch.randn(1, 3, size, size, generator=g),)


def _tokens(g: torch.Generator) -> tuple:
    return (torch.randint(0, VOCAB, (1, SEQ), generator=g),)


def _audio(g: torch.Generator) -> tuple:
    return (torch.randn(1, 4000, generator=g),)


#: name -> (builder, input maker)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.Generator], tuple]]] = {
    "resnet18": (_vision("resnet18"), _image()),
    "resnet50": (_vision("resnet50"), _image()),
    "mobilenet_v2": (_vision("mobilenet_v2"), _image()),
    "mobilenet_v3_small": (_vision("mobilenet_v3_small"), _image()),
    "efficientnet_b0": (_vision("efficientnet_b0"), _image()),
    "shufflenet_v2": (_vision("shufflenet_v2_x1_0"), _image()),
    "convnext_tiny": (_vision("convnext_tiny"), _image()),
    "vit_b_16": (_vision("vit_b_16"), _image()),
    "swin_t": (_vision("swin_t"), _image()),
    "bert": (_bert, _tokens),
    "distilbert": (_distilbert, _tokens),
    "gpt2": (_gpt2, _tokens),
    "t5_encoder": (_t5_encoder, _tokens),
    "llama": (_llama, _tokens),
    "hf_vit": (_hf_vit, _image(32)),
    "wav2vec2": (_wav2vec2, _audio),
}
BACKENDS = ("x86", "xnnpack")
IMPLEMENTATIONS = ("qcore", "torchao")


# ----------------------------------------------------------------------------- measures
def batches(make: Callable[[torch.Generator], tuple], count: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [make(g) for _ in range(count)]


def reestimate_batch_norm(model: torch.nn.Module, data: list[tuple]) -> None:
    """Running statistics of every batch norm recomputed on ``data`` (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for batch in data:
            model(*batch)
    model.eval()


def sqnr(reference: torch.Tensor, actual: torch.Tensor) -> float:
    noise = (reference.float() - actual.float()).pow(2).mean()
    return float("inf") if noise == 0 else float(10 * torch.log10(reference.float().pow(2).mean() / noise))


def mean_sqnr(model: Callable, reference: list[torch.Tensor], data: list[tuple]) -> float:
    with torch.no_grad():
        return statistics.mean(sqnr(r, model(*batch)) for r, batch in zip(reference, data))


def qdq_count(gm: torch.fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.name.startswith("quantized_decomposed::"):
            count += schema.name.split("::")[1].startswith(("quantize_per", "dequantize_per"))
    return count


aten = torch.ops.aten
#: op -> positions of its weight operand
WEIGHT_OPS = {
    aten.conv1d.default: (1,), aten.conv2d.default: (1,), aten.conv3d.default: (1,), aten.convolution.default: (1,),
    aten.conv1d.padding: (1,), aten.conv2d.padding: (1,), aten.linear.default: (1,),
    aten.addmm.default: (2,), aten.mm.default: (1,), aten.matmul.default: (1,),
}
PASS_THROUGH = (aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
                aten.expand.default, aten.clone.default, aten.contiguous.default, aten._unsafe_view.default)


FLOAT_KERNELS = ("mkl._mkl_linear", "mkldnn._linear_pointwise", "mkldnn._convolution_pointwise",
                 "mkldnn._convolution_transpose_pointwise")


def _input_dependent(gm: torch.fx.GraphModule) -> set:
    """The nodes whose value depends on a graph input (activations; the rest are constants)."""
    dependent: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _weight_kind(node: Any, dependent: set) -> Optional[str]:
    """"int8" (a dequantize on the way), "float" (a constant, possibly computed: weight norm) or
    None (an activation) behind a weight operand."""
    if not isinstance(node, torch.fx.Node) or node in dependent:
        return None
    for _ in range(8):
        if node.op == "call_function" and "dequantize" in str(node.target):
            return "int8"
        if node.op != "call_function" or node.target not in PASS_THROUGH:
            return "float"
        node = node.args[0]
    return "float"


def weight_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many weight ops (conv, linear, addmm, constant-weight mm/matmul) read a float or an
    int8 (dequantized) constant weight, and how many fp32 oneDNN/MKL kernels the graph runs."""
    dependent = _input_dependent(gm)
    counts = {"float": 0, "int8": 0, "float_kernels": 0}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if any(str(node.target).startswith(name) for name in FLOAT_KERNELS):
            counts["float_kernels"] += 1
            continue
        positions = WEIGHT_OPS.get(node.target)
        if positions is None or len(node.args) <= positions[0]:
            continue
        kind = _weight_kind(node.args[positions[0]], dependent)
        if kind is not None:
            counts[kind] += 1
    return counts


def float_weight_ops_left(gm: torch.fx.GraphModule) -> int:
    """Weight ops of a lowered graph that do not run as int8 kernels: aten ops with a constant
    weight (float, or dequantized: simulated) and fp32 oneDNN/MKL kernels."""
    counts = weight_ops(gm)
    return counts["float"] + counts["int8"] + counts["float_kernels"]


def median_ms(fn: Callable, inputs: tuple, repeat: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn(*inputs)
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# ----------------------------------------------------------------------------- one process
def _quantizer(impl: str, backend: str) -> tuple[Any, Callable, Callable]:
    """(quantizer, prepare_pt2e, convert_pt2e) of ``impl`` for ``backend``."""
    if impl == "qcore":
        import qcore

        if backend == "x86":
            from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

            quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        else:
            from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        return quantizer, qcore.prepare_pt2e, qcore.convert_pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if backend == "x86":
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    else:
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return quantizer, prepare_pt2e, convert_pt2e


def _lower(impl: str, converted: Any, example: tuple) -> Any:
    if impl == "qcore":
        import qcore

        return qcore.lower(converted, backend="onednn", example_inputs=example)
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    return lower_pt2e_quantized_to_x86(converted, example)


def _compile_int8(impl: str, converted: Any, example: tuple) -> Callable:
    if impl == "qcore":
        import qcore

        return qcore.compile(converted, backend="onednn", example_inputs=example)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(converted)
        compiled(*example)
    return compiled


def measure(model_name: str, impl: str, backend: str, latency: bool = False, compile_: bool = False, repeat: int = 20) -> dict:
    """Everything the table shows for one (model, implementation, backend), in this process."""
    record: dict[str, Any] = {"model": model_name, "impl": impl, "backend": backend, "ok": False}
    try:
        try:
            import_torchvision()
        except ImportError:
            pass  # not installed: its models fail alone, the others do not need it
        torch.manual_seed(0)
        build, make_inputs = MODELS[model_name]
        model = build().eval()
        calibration = batches(make_inputs, CALIBRATION_BATCHES, seed=1)
        evaluation = batches(make_inputs, EVAL_BATCHES, seed=2)
        reestimate_batch_norm(model, calibration)
        with torch.no_grad():
            reference = [model(*batch) for batch in evaluation]
        example = calibration[0]
        exported = torch.export.export(model, example).module()
        record["weight_ops"] = weight_ops(exported)["float"]
        quantizer, prepare, convert = _quantizer(impl, backend)
        start = time.perf_counter()
        prepared = prepare(exported, quantizer)
        record["prepare_s"] = time.perf_counter() - start
        with torch.no_grad():
            for batch in calibration:
                prepared(*batch)
        start = time.perf_counter()
        converted = convert(prepared)
        record["convert_s"] = time.perf_counter() - start
        record["qdq"] = qdq_count(converted)
        record["sqnr_qdq"] = mean_sqnr(converted, reference, evaluation)
        record["int8_ops"] = weight_ops(converted)["int8"]
        if backend == "x86":
            try:
                lowered = _lower(impl, converted, example)
            except Exception as exc:  # the q/dq figures stand; the lowered ones are missing
                traceback.print_exc(file=sys.stderr)
                record["ok"], record["int8_ops"] = True, 0  # nothing runs as an int8 kernel
                record["lowered_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
                return record
            record["sqnr_lowered"] = mean_sqnr(lowered, reference, evaluation)
            record["int8_ops"] = record["weight_ops"] - float_weight_ops_left(lowered)
            if latency:
                record["fp32_ms"] = median_ms(model, example, repeat)
                record["int8_lowered_ms"] = median_ms(lowered, example, repeat)
            if compile_:
                compiled_fp32 = torch.compile(model)
                record["fp32_compiled_ms"] = median_ms(compiled_fp32, example, repeat)
                record["int8_compiled_ms"] = median_ms(_compile_int8(impl, converted, example), example, repeat)
        record["ok"] = True
    except Exception as exc:  # a row of the table, not the end of the run (traceback on stderr)
        traceback.print_exc(file=sys.stderr)
        record["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return record


def run_child(model_name: str, impl: str, backend: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh interpreter (no state shared between implementations)."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", model_name, impl, backend, "--repeat", str(args.repeat)]
    command += ["--latency"] * args.latency + ["--compile"] * args.compile
    record = {"model": model_name, "impl": impl, "backend": backend, "ok": False}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**record, "error": f"timeout after {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**record, "error": f"child exited {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ----------------------------------------------------------------------------- report
def _cell(record: Optional[dict]) -> str:
    if record is None:
        return "-"
    if not record["ok"]:
        return "error: " + record.get("error", "?")[:48]
    lowered = f" / {record['sqnr_lowered']:5.1f}" if "sqnr_lowered" in record else " / err" if "lowered_error" in record else ""
    return f"{record['qdq']:4d} q/dq  {record['int8_ops']:3d}/{record['weight_ops']:<3d} int8  {record['sqnr_qdq']:5.1f}{lowered} dB"


def table(records: list[dict]) -> str:
    """One row per (model, backend): qcore, torchao, prepare+convert time ratio (and latencies)."""
    index = {(r["model"], r["backend"], r["impl"]): r for r in records}
    rows = sorted({(r["model"], r["backend"]) for r in records}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    width = 58
    lines = [f"{'model':<20}{'backend':<9}{'qcore: q/dq, int8 ops, SQNR q/dq [/ lowered]':<{width}}"
             f"{'torchao':<{width}}time qcore/torchao"]
    for model_name, backend in rows:
        ours, theirs = index.get((model_name, backend, "qcore")), index.get((model_name, backend, "torchao"))
        ratio = "-"
        if ours and theirs and ours["ok"] and theirs["ok"]:
            ratio = f"{(ours['prepare_s'] + ours['convert_s']) / (theirs['prepare_s'] + theirs['convert_s']):.2f}"
        lines.append(f"{model_name:<20}{backend:<9}{_cell(ours):<{width}}{_cell(theirs):<{width}}{ratio}")
        for label, rec in (("qcore", ours), ("torchao", theirs)):
            if rec and rec.get("ok") and "fp32_ms" in rec:
                timing = f"fp32 {rec['fp32_ms']:.2f} ms, int8 lowered {rec['int8_lowered_ms']:.2f} ms"
                if "int8_compiled_ms" in rec:
                    timing += f", fp32 compiled {rec['fp32_compiled_ms']:.2f} ms, int8 compiled {rec['int8_compiled_ms']:.2f} ms"
                lines.append(f"{'':<29}{label} latency: {timing}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--latency", action="store_true", help="time eager fp32 and lowered int8 (x86)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile fp32 and compiled int8 (x86)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per latency (median)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    parser.add_argument("--json", default="bench_zoo.json", help="where to write the records")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "IMPL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model_name, impl, backend = args.worker
        record = measure(model_name, impl, backend, latency=args.latency, compile_=args.compile, repeat=args.repeat)
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        return
    records = []
    for model_name in args.models:
        for backend in args.backends:
            for impl in args.impls:
                record = run_child(model_name, impl, backend, args)
                records.append(record)
                status = "ok" if record["ok"] else record.get("error", "")
                print(f"[{model_name} {backend} {impl}] {status}", file=sys.stderr, flush=True)
    with open(args.json, "w") as handle:
        json.dump(records, handle, indent=1)
    print(f"CPU threads: {torch.get_num_threads()}; {CALIBRATION_BATCHES} calibration, {EVAL_BATCHES} evaluation batches; "
          f"int8 ops = conv/linear/addmm/constant-weight matmul running int8 (x86: lowered) of all; records: {args.json}")
    print(table(records))


if __name__ == "__main__":
    main()
