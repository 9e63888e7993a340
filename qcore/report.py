"""What quantization did to a model, node by node: ``build_report`` and ``QuantizationReport``.

For every compute node of the float program the report says whether it runs on int8 inputs
after ``convert_pt2e`` or stays float, and why; for each quantized node the SQNR of its output
against the same node of the float program (the converted graph keeps the exported node
names, so nodes pair by name); the model-level SQNR; float vs quantized latency; and, when the
model was lowered, which kernels it runs (integer kernels vs float ops). ``write(directory)``
writes ``report.md`` and ``sqnr.png`` (a bar chart of per-node SQNR, matplotlib's Agg backend).
After quantization-aware training (``qcore.quantize(qat=True)``) ``report.training`` says how the
model was trained (epochs, learning rate, loss per epoch; or the user's ``train_fn``).

>>> import torch, qcore
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid()).eval()
>>> result = qcore.quantize(model, (torch.randn(2, 4),), backend="onednn", measure_latency=False)
>>> [(n.name, n.quantized) for n in result.report.nodes]
[('linear', True), ('sigmoid', False)]
>>> result.report.nodes[1].reason
'no onednn annotator handles aten.sigmoid'
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

import attrs
import torch
from torch.fx import GraphModule, Interpreter, Node

from qcore.annotation import ANNOTATION_KEY, kept_float_reason
from qcore.coverage import QUANTIZABLE_OPS
from qcore.passes.qdq_ops import is_dequantize, is_quantize

__all__ = ["NodeReport", "KernelCount", "TrainingSummary", "QuantizationReport", "build_report", "sqnr_db", "time_model"]

INTEGER_KERNEL_NAMESPACES = ("onednn", "quantized", "qcore_onednn")
_SKIPPED_TARGETS = ("getitem",)


def sqnr_db(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``reference``, in dB (inf if equal)."""
    reference = reference.detach().double().flatten()
    noise = (reference - actual.detach().double().flatten()).pow(2).mean()
    signal = reference.pow(2).mean()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return float(10 * torch.log10(signal / noise))


@attrs.frozen
class NodeReport:
    """One compute node of the float program: ``quantized`` (runs on int8 inputs) or float, why, and its SQNR."""

    name: str
    op: str
    quantized: bool
    reason: str
    sqnr_db: Optional[float] = None


@attrs.frozen
class KernelCount:
    """One kind of op in the lowered program: ``kind`` is "integer kernel", "q/dq" or "float"."""

    op: str
    kind: str
    count: int


@attrs.frozen
class TrainingSummary:
    """How quantization-aware training ran: ``method`` is "built-in loop" or "train_fn".

    For the built-in loop: ``epochs``, Adam's ``lr``, the ``loss_fn`` name, the mean training
    loss of each epoch and whether the last epoch ran with ranges and batch-norm frozen; for a
    ``train_fn``: its name (what it did is the user's).

    >>> TrainingSummary("built-in loop", epochs=2, lr=1e-4, optimizer="Adam", loss_fn="cross_entropy",
    ...                 epoch_losses=(0.5, 0.25), batches_per_epoch=10).describe()
    'built-in loop: 2 epochs of 10 batches, Adam lr 0.0001, loss cross_entropy per epoch 0.5000 -> 0.2500 (final 0.2500)'
    """

    method: str
    epochs: Optional[int] = None
    lr: Optional[float] = None
    optimizer: Optional[str] = None
    loss_fn: Optional[str] = None
    epoch_losses: tuple = ()
    batches_per_epoch: Optional[int] = None
    frozen_last_epoch: bool = False
    train_fn: Optional[str] = None

    @property
    def final_loss(self) -> Optional[float]:
        """The mean training loss of the last epoch (None for a ``train_fn``)."""
        return self.epoch_losses[-1] if self.epoch_losses else None

    def describe(self) -> str:
        if self.method == "train_fn":
            return f"your train_fn {self.train_fn} fine-tuned the fake-quantized model"
        losses = " -> ".join(f"{value:.4f}" for value in self.epoch_losses)
        text = (
            f"built-in loop: {self.epochs} epoch{'s' if self.epochs != 1 else ''} of {self.batches_per_epoch} batches, "
            f"{self.optimizer} lr {self.lr:g}, loss {self.loss_fn} per epoch {losses} (final {self.final_loss:.4f})"
        )
        if self.frozen_last_epoch:
            text += "; last epoch with ranges and batch norm frozen"
        return text


@attrs.define
class QuantizationReport:
    """The report; see the module docstring. ``accuracy`` is ``{"float": x, "quantized": y}`` when
    given (more keys: further rows of the quantized column, e.g. ``"quantized without QAT"``).
    ``training``: a :class:`TrainingSummary` when the model was trained with QAT, else None."""

    backend: str
    nodes: list
    model_sqnr_db: Optional[float]
    kernels: list = attrs.field(factory=list)
    lowering_counters: dict = attrs.field(factory=dict)
    latency_ms: dict = attrs.field(factory=dict)
    accuracy: dict = attrs.field(factory=dict)
    title: str = "qcore quantization report"
    training: Optional[TrainingSummary] = None

    @property
    def speedup(self) -> Optional[float]:
        float_ms, quantized_ms = self.latency_ms.get("float"), self.latency_ms.get("quantized")
        if not float_ms or not quantized_ms:
            return None
        return float_ms / quantized_ms

    def explain(self) -> str:
        """Plain text: which ops run as integer kernels and which stay float, and why."""
        lines = [f"backend {self.backend}:"]
        if self.training is not None:
            lines.append(f"  quantization-aware training: {self.training.describe()}")
        integer = [k for k in self.kernels if k.kind == "integer kernel"]
        floats = [k for k in self.kernels if k.kind == "float"]
        if self.kernels:
            lines.append("  integer kernels: " + (", ".join(f"{k.op} x{k.count}" for k in integer) or "none"))
            lines.append("  float ops: " + (", ".join(f"{k.op} x{k.count}" for k in floats) or "none"))
        for node in self.nodes:
            state = "int8" if node.quantized else "float"
            lines.append(f"  {node.name} ({node.op}): {state}: {node.reason}")
        return "\n".join(lines)

    def to_markdown(self, chart: Optional[str] = None) -> str:
        lines = [f"# {self.title}", "", f"Backend: `{self.backend}`", ""]
        if self.training is not None:
            lines += [f"Quantization-aware training: {self.training.describe()}.", ""]
        lines += ["## Summary", "", "| measure | float | quantized |", "| --- | --- | --- |"]
        if self.accuracy:
            lines.append(f"| accuracy | {self.accuracy['float']:.2%} | {self.accuracy['quantized']:.2%} |")
            for key, value in self.accuracy.items():
                if key not in ("float", "quantized"):
                    lines.append(f"| accuracy, {key} | - | {value:.2%} |")
        if self.latency_ms:
            lines.append(f"| latency (ms per batch) | {self.latency_ms['float']:.3f} | {self.latency_ms['quantized']:.3f} |")
        lines.append("")
        if self.model_sqnr_db is not None:
            against = " (the float model before QAT: training moved the weights)" if self.training is not None else ""
            lines.append(f"Model output SQNR vs float{against}: {_db(self.model_sqnr_db)}")
        if self.speedup is not None:
            lines.append(f"Speedup (float / quantized latency): {self.speedup:.2f}x")
        quantized = sum(1 for n in self.nodes if n.quantized)
        lines += ["", f"{quantized} of {len(self.nodes)} compute nodes run on int8 inputs.", ""]
        lines += ["## Nodes", "", "| node | op | quantized | reason | SQNR (dB) |", "| --- | --- | --- | --- | --- |"]
        for node in self.nodes:
            sqnr = _db(node.sqnr_db) if node.sqnr_db is not None else "-"
            lines.append(f"| {node.name} | {node.op} | {'int8' if node.quantized else 'float'} | {node.reason} | {sqnr} |")
        if chart:
            lines += ["", f"![per-node SQNR]({chart})"]
        if self.kernels:
            lines += ["", "## Kernels after lowering", "", "| op | runs as | count |", "| --- | --- | --- |"]
            for kernel in self.kernels:
                lines.append(f"| `{kernel.op}` | {kernel.kind} | {kernel.count} |")
        if self.lowering_counters:
            lines += ["", "Lowering pattern matches: " + ", ".join(
                f"{k.replace('_matcher_count', '')} {v}" for k, v in sorted(self.lowering_counters.items())
                if k.endswith("_matcher_count"))]
        return "\n".join(lines) + "\n"

    def write(self, directory: "str | os.PathLike") -> str:
        """Write ``report.md`` and ``sqnr.png`` into ``directory`` (created); returns the report's path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        chart = self.write_chart(os.path.join(directory, "sqnr.png"))
        path = os.path.join(directory, "report.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_markdown(chart=os.path.basename(chart) if chart else None))
        return path

    def write_chart(self, path: str) -> Optional[str]:
        """A PNG bar chart of the quantized nodes' SQNR; None if matplotlib is missing."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [(n.name, n.sqnr_db) for n in self.nodes if n.sqnr_db is not None and math.isfinite(n.sqnr_db)]
        figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.5))
        axes.bar([name for name, _ in rows], [value for _, value in rows], color="tab:blue")
        axes.set_ylabel("SQNR vs float (dB)")
        axes.set_title(f"Per-node SQNR ({self.backend})")
        axes.tick_params(axis="x", rotation=45)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f} dB"


# --------------------------------------------------------------------------- building
class _Recorder(Interpreter):
    """Runs a GraphModule and keeps every node's tensor output by node name."""

    def __init__(self, module: GraphModule) -> None:
        super().__init__(module)
        self.outputs: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.outputs[n.name] = result.detach()
        return result


def _record(module: GraphModule, inputs: tuple) -> tuple[Any, dict]:
    recorder = _Recorder(module)
    with torch.no_grad():
        result = recorder.run(*inputs)
    return result, recorder.outputs


def _op_name(node: Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return name


def _is_compute(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    return not (is_quantize(node) or is_dequantize(node)) and node.target.namespace == "aten"


def _is_buffer_update(node: Node) -> bool:
    mutates = node.target._schema.is_mutable if isinstance(node.target, torch._ops.OpOverload) else False
    first = node.args[0] if node.args else None
    return mutates and not node.users and isinstance(first, Node) and first.op == "get_attr"


def _float_reason(converted_node: Node, backend: str) -> str:
    """Why a node of the converted graph runs on float inputs (its annotation says if it was claimed)."""
    annotation = converted_node.meta.get(ANNOTATION_KEY)
    if annotation is not None and getattr(annotation, "_annotated", False):
        producers = [a for a in converted_node.all_input_nodes if _is_compute(a)]
        anchor = producers[0].name if producers else "its producer"
        return f"fused into the int8 partition of {anchor} (output quantized after it)"
    kept_float = kept_float_reason(converted_node)
    if kept_float is not None:
        return f"kept float by the {backend} recipe: {kept_float}"
    if converted_node.target in QUANTIZABLE_OPS:
        return f"quantizable, but no {backend} pattern matched here (scope set to None or unsupported form)"
    return f"no {backend} annotator handles {_op_name(converted_node)}"


def classify_nodes(exported: GraphModule, converted: GraphModule, backend: str) -> list[NodeReport]:
    """One NodeReport per aten compute node of ``exported`` (no SQNR yet); in-place updates of
    buffers (batch norm's ``num_batches_tracked += 1`` in a train-mode export) are not compute."""
    by_name = {node.name: node for node in converted.graph.nodes}
    reports = []
    for node in exported.graph.nodes:
        if not _is_compute(node) or _is_buffer_update(node):
            continue
        twin = by_name.get(node.name)
        if twin is None:
            reports.append(NodeReport(node.name, _op_name(node), False, "folded away by convert (e.g. batch norm into conv)"))
            continue
        dequantized = [a.name for a in twin.all_input_nodes if is_dequantize(a)]
        if dequantized:
            reports.append(NodeReport(node.name, _op_name(node), True, f"int8 inputs ({len(dequantized)} dequantized)"))
        else:
            reports.append(NodeReport(node.name, _op_name(node), False, _float_reason(twin, backend)))
    return reports


def count_kernels(lowered: GraphModule, inputs: tuple) -> list[KernelCount]:
    """The ops of ``lowered`` by kind: integer kernels (oneDNN/quantized ops, aten ops on int8 data), q/dq, float."""
    _, outputs = _record(lowered, inputs)
    counts: dict[tuple[str, str], int] = {}
    for node in lowered.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") in _SKIPPED_TARGETS:
            continue
        op = _op_name(node)
        namespace = getattr(node.target, "namespace", "")
        if namespace in INTEGER_KERNEL_NAMESPACES:
            kind = "integer kernel"
        elif namespace == "quantized_decomposed":
            kind = "q/dq"
        else:
            value = outputs.get(node.name)
            integer = isinstance(value, torch.Tensor) and not value.is_floating_point()
            kind = "integer kernel" if integer else "float"
        counts[(op, kind)] = counts.get((op, kind), 0) + 1
    order = {"integer kernel": 0, "q/dq": 1, "float": 2}
    return [KernelCount(op, kind, n) for (op, kind), n in sorted(counts.items(), key=lambda item: (order[item[0][1]], item[0][0]))]


def time_model(fn: Callable[..., Any], inputs: tuple, budget_s: float = 0.5, min_runs: int = 5) -> float:
    """Median milliseconds per call of ``fn(*inputs)`` (no grad), within about ``budget_s`` seconds."""
    times = []
    with torch.no_grad():
        fn(*inputs)  # warm up
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 1000):
            t0 = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return None


def build_report(
    exported: GraphModule,
    converted: GraphModule,
    lowered: Optional[GraphModule],
    backend: str,
    sample_inputs: tuple,
    measure_latency: bool = True,
    training: Optional[TrainingSummary] = None,
) -> QuantizationReport:
    """Compare ``converted`` (and ``lowered``) with the float ``exported`` program on ``sample_inputs``
    (``exported`` must be in eval mode: it is run, and a train-mode graph would update batch-norm
    statistics). ``training``: how QAT trained the model, if it did."""
    nodes = classify_nodes(exported, converted, backend)
    float_result, float_outputs = _record(exported, sample_inputs)
    quant_result, quant_outputs = _record(converted, sample_inputs)
    with_sqnr = []
    for node in nodes:
        reference, actual = float_outputs.get(node.name), quant_outputs.get(node.name)
        value = None
        if node.quantized and reference is not None and actual is not None and reference.shape == actual.shape and reference.is_floating_point():
            value = sqnr_db(reference, actual)
        with_sqnr.append(attrs.evolve(node, sqnr_db=value))
    reference, actual = _first_tensor(float_result), _first_tensor(quant_result)
    model_sqnr = sqnr_db(reference, actual) if reference is not None and actual is not None else None
    report = QuantizationReport(backend=backend, nodes=with_sqnr, model_sqnr_db=model_sqnr, training=training)
    if lowered is not None:
        report.kernels = count_kernels(lowered, sample_inputs)
        report.lowering_counters = dict(lowered.meta.get("qcore_lowered", {}).get("counters", {}))
    if measure_latency:
        report.latency_ms = {
            "float": time_model(exported, sample_inputs),
            "quantized": time_model(lowered if lowered is not None else converted, sample_inputs),
        }
    return report
