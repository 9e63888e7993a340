"""What quantization did to a model, node by node: ``build_report`` and ``QuantizationReport``.

For every compute node of the float program the report says whether it runs on int8 inputs
after ``convert_pt2e`` or stays float, and why; for each quantized node the SQNR of its output
against the same node of the float program (the converted graph keeps the exported node
names, so nodes pair by name; a node into which convert folded the batch norm after it is
compared with the float batch norm's output). The model-level SQNR is that of the model the
user runs: the lowered program when there is one (``lowered_sqnr_db``), with the q/dq
program's figure beside it (``qdq_sqnr_db``), so a saturating kernel or a lowering bug shows.
Per-node SQNR stays on the q/dq program: lowering fuses nodes and loses their names. Also:
float vs quantized latency; when the model was lowered, which kernels it runs (integer kernels
vs float ops); the hardware the backend chose its scheme for (``hardware``, the backend's
keys). ``write(directory)`` writes ``report.md`` and ``sqnr.png`` (horizontal bars of per-node
SQNR, the worst 40 when there are more; matplotlib's Agg backend).
After quantization-aware training (``qcore.quantize(qat=True)``) ``report.training`` says how the
model was trained (epochs, learning rate, loss per epoch; or the user's ``train_fn``).

>>> import torch, qcore
>>> model = torch.nn.Sequential(torch.nn.Sigmoid(), torch.nn.Linear(4, 8)).eval()
>>> result = qcore.quantize(model, (torch.randn(2, 4),), backend="reference", measure_latency=False)
>>> [(n.name, n.quantized) for n in result.report.nodes]
[('sigmoid', False), ('linear', True)]
>>> result.report.nodes[0].reason
'no reference annotator handles aten.sigmoid'
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

import attrs
import torch
from torch.fx import GraphModule, Interpreter, Node

from qcore.accuracy.partitions import ACCURACY_FLOAT_KEY
from qcore.annotation import ANNOTATION_KEY, kept_float_reason
from qcore.metrics import sqnr_db
from qcore.coverage import QUANTIZABLE_OPS
from qcore.passes.conv_bn_patterns import batch_norm_kind, batch_norm_output
from qcore.passes.qdq_ops import is_dequantize, is_quantize

__all__ = [
    "NodeReport", "KernelCount", "TrainingSummary", "FloatDecision", "QuantizationReport", "build_report", "sqnr_db", "time_model",
    "sensitivity_markdown", "write_sensitivity", "write_sensitivity_chart",
]

_SKIPPED_TARGETS = ("getitem",)
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.quint8, torch.qint8)
_CAST_OPS = ("aten.to", "aten._to_copy", "prims.convert_element_type")
CHART_MAX_BARS = 40  # the chart draws the worst 40 nodes of a larger model
CHART_MARGIN_DB = 3.0  # nodes this far below the q/dq model's output SQNR are drawn in orange


NO_CHART_NOTE = "(No SQNR chart: matplotlib is not installed; `pip install qcore[report]` adds it.)"


@attrs.frozen
class NodeReport:
    """One compute node of the float program: ``quantized`` (runs on int8 inputs) or float, why, and its SQNR.

    ``sqnr_reference``: the float node the SQNR was measured against when it is not this node
    (the batch norm that convert folded into it), else None.
    """

    name: str
    op: str
    quantized: bool
    reason: str
    sqnr_db: Optional[float] = None
    sqnr_reference: Optional[str] = None


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


@attrs.frozen
class FloatDecision:
    """A partition ``qcore.quantize(min_sqnr_db=... or accuracy_fn=...)`` kept float: its anchor
    ``partition``, fused ``nodes``, the ``step`` of the greedy search that chose it, the measure
    before and after (``before``/``after``: output SQNR in dB, or the user's metric) and ``why``."""

    partition: str
    nodes: tuple
    step: int
    before: float
    after: float
    why: str


@attrs.define
class QuantizationReport:
    """The report; see the module docstring. ``accuracy`` is ``{"float": x, "quantized": y}`` when
    given (more keys: further rows of the quantized column, e.g. ``"quantized without QAT"``).
    ``training``: a :class:`TrainingSummary` when the model was trained with QAT, else None.

    ``model_sqnr_db`` is the output SQNR of the model the user runs: ``lowered_sqnr_db`` when the
    model was lowered, else ``qdq_sqnr_db`` (the converted q/dq program's). ``hardware``: what
    the backend says about the machine it quantized for (its own keys; ``"describe"``, if
    present, is the one-line summary the report prints)."""

    backend: str
    nodes: list
    model_sqnr_db: Optional[float]
    qdq_sqnr_db: Optional[float] = None
    lowered_sqnr_db: Optional[float] = None
    hardware: dict = attrs.field(factory=dict)
    kernels: list = attrs.field(factory=list)
    lowering_counters: dict = attrs.field(factory=dict)
    latency_ms: dict = attrs.field(factory=dict)
    accuracy: dict = attrs.field(factory=dict)
    title: str = "qcore quantization report"
    training: Optional[TrainingSummary] = None
    sensitivity: list = attrs.field(factory=list)
    kept_float: list = attrs.field(factory=list)
    algorithms: list = attrs.field(factory=list)
    accuracy_target: Optional[str] = None

    @property
    def speedup(self) -> Optional[float]:
        float_ms, quantized_ms = self.latency_ms.get("float"), self.latency_ms.get("quantized")
        if not float_ms or not quantized_ms:
            return None
        return float_ms / quantized_ms

    def hardware_line(self) -> Optional[str]:
        """``hardware["describe"]`` if the backend gave it, else the ``key=value`` pairs; None if empty."""
        if not self.hardware:
            return None
        if "describe" in self.hardware:
            return str(self.hardware["describe"])
        return ", ".join(f"{key}={value}" for key, value in self.hardware.items())

    def sqnr_lines(self) -> list[str]:
        """The model-level SQNR: the program the user runs first, then the q/dq figure when lowered."""
        against = " (the float model before QAT: training moved the weights)" if self.training is not None else ""
        if self.lowered_sqnr_db is not None:
            lines = [f"Model output SQNR vs float (lowered, what runs){against}: {_db(self.lowered_sqnr_db)}"]
            if self.qdq_sqnr_db is not None:
                lines.append(f"q/dq program: {_db(self.qdq_sqnr_db)}")
            return lines
        if self.qdq_sqnr_db is not None:
            return [f"Model output SQNR vs float (q/dq program, not lowered){against}: {_db(self.qdq_sqnr_db)}"]
        if self.model_sqnr_db is not None:
            return [f"Model output SQNR vs float{against}: {_db(self.model_sqnr_db)}"]
        return []

    def explain(self) -> str:
        """Plain text: which ops run as integer kernels and which stay float, and why."""
        lines = [f"backend {self.backend}:"]
        hardware = self.hardware_line()
        if hardware is not None:
            lines.append(f"  hardware: {hardware}")
        sqnr = self.sqnr_lines()
        if sqnr:
            text = "; ".join(sqnr)
            lines.append(f"  {text[0].lower()}{text[1:]}")
        if self.training is not None:
            lines.append(f"  quantization-aware training: {self.training.describe()}")
        integer = [k for k in self.kernels if k.kind == "integer kernel"]
        floats = [k for k in self.kernels if k.kind == "float"]
        if self.kernels:
            lines.append("  integer kernels: " + (", ".join(f"{k.op} x{k.count}" for k in integer) or "none"))
            lines.append("  float ops: " + (", ".join(f"{k.op} x{k.count}" for k in floats) or "none"))
        for line in self.accuracy_lines():
            lines.append(f"  {line}")
        for node in self.nodes:
            state = "int8" if node.quantized else "float"
            lines.append(f"  {node.name} ({node.op}): {state}: {node.reason}")
        return "\n".join(lines)

    def accuracy_lines(self) -> list[str]:
        """What the accuracy options did: the algorithms applied, the target and the partitions kept float."""
        lines = [f"algorithm {text}" for text in self.algorithms]
        if self.accuracy_target is not None:
            lines.append(f"accuracy target: {self.accuracy_target}")
        for decision in self.kept_float:
            lines.append(
                f"kept float: {decision.partition} ({', '.join(decision.nodes)}), step {decision.step}: {decision.why}"
            )
        return lines

    def to_markdown(self, chart: Optional[str] = None, chart_missing: bool = False) -> str:
        lines = [f"# {self.title}", "", f"Backend: `{self.backend}`", ""]
        hardware = self.hardware_line()
        if hardware is not None:
            lines += [f"Hardware: {hardware}", ""]
        if self.training is not None:
            lines += [f"Quantization-aware training: {self.training.describe()}.", ""]
        lines += ["## Summary", ""]
        if self.accuracy or self.latency_ms:
            lines += ["| measure | float | quantized |", "| --- | --- | --- |"]
        if self.accuracy:
            lines.append(f"| accuracy | {self.accuracy['float']:.2%} | {self.accuracy['quantized']:.2%} |")
            for key, value in self.accuracy.items():
                if key not in ("float", "quantized"):
                    lines.append(f"| accuracy, {key} | - | {value:.2%} |")
        if self.latency_ms:
            lines.append(f"| latency (ms per batch) | {self.latency_ms['float']:.3f} | {self.latency_ms['quantized']:.3f} |")
        if self.accuracy or self.latency_ms:
            lines.append("")
        sqnr = self.sqnr_lines()
        if sqnr:
            lines.append(f"- {sqnr[0]}")
            lines += [f"  - {line}" for line in sqnr[1:]]
        if self.speedup is not None:
            lines.append(f"- Speedup (float / quantized latency): {self.speedup:.2f}x")
        quantized = sum(1 for n in self.nodes if n.quantized)
        lines += ["", f"{quantized} of {len(self.nodes)} compute nodes run on int8 inputs.", ""]
        if self.algorithms or self.accuracy_target is not None or self.kept_float:
            lines += ["## Accuracy", ""]
            lines += [f"- Algorithm {text}" for text in self.algorithms]
            if self.accuracy_target is not None:
                lines.append(f"- Accuracy target: {self.accuracy_target}")
            if self.kept_float:
                lines += ["", "Partitions kept float (greedy, by sensitivity):", "",
                          "| step | partition | nodes | before | after | why |", "| --- | --- | --- | --- | --- | --- |"]
                for d in self.kept_float:
                    lines.append(f"| {d.step} | {d.partition} | {', '.join(d.nodes)} | {d.before:.4g} | {d.after:.4g} | {d.why} |")
            lines.append("")
        if self.sensitivity:
            lines += ["## Sensitivity", "", sensitivity_markdown(self.sensitivity), ""]
            if chart:
                lines += ["![partition sensitivity](sensitivity.png)", ""]
        lines += [
            "## Nodes",
            "",
            "Per-node SQNR is measured on the q/dq program (convert's output), not on the lowered one: "
            "lowering fuses nodes and loses their names. A node into which convert folded the batch norm "
            "after it is compared with the float batch norm's output. Each figure is the error accumulated "
            "up to that node, so it tends to fall with depth; the model output can sit above its deep "
            "layers when pooling averages the noise out.",
            "",
            "| node | op | quantized | reason | SQNR (dB) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for node in self.nodes:
            sqnr_cell = "-"
            if node.sqnr_db is not None:
                sqnr_cell = _db(node.sqnr_db)
                if node.sqnr_reference is not None:
                    sqnr_cell += f" (vs {node.sqnr_reference}, folded in)"
            lines.append(f"| {node.name} | {node.op} | {'int8' if node.quantized else 'float'} | {node.reason} | {sqnr_cell} |")
        if chart:
            lines += ["", f"![per-node SQNR]({chart})"]
        elif chart_missing:
            lines += ["", NO_CHART_NOTE]
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
        if self.sensitivity:
            write_sensitivity_chart(self.sensitivity, os.path.join(directory, "sensitivity.png"), title=f"Partition sensitivity ({self.backend})")
        path = os.path.join(directory, "report.md")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_markdown(chart=os.path.basename(chart) if chart else None, chart_missing=chart is None))
        return path

    def chart_rows(self, max_bars: int = CHART_MAX_BARS) -> tuple[list[tuple[str, float]], str]:
        """The ``(node, SQNR)`` bars of the chart and its title: every quantized node with a finite
        SQNR in graph order, or, when there are more than ``max_bars``, the worst ``max_bars``,
        worst first."""
        rows = [(n.name, n.sqnr_db) for n in self.nodes if n.sqnr_db is not None and math.isfinite(n.sqnr_db)]
        total = len(rows)
        if total > max_bars:
            worst = sorted(rows, key=lambda row: row[1])[:max_bars]
            return worst, f"Per-node SQNR ({self.backend}): worst {max_bars} of {total} nodes, worst first"
        return rows, f"Per-node SQNR ({self.backend}): {total} node{'s' if total != 1 else ''}, in graph order"

    def write_chart(self, path: str, max_bars: int = CHART_MAX_BARS) -> Optional[str]:
        """A PNG of the quantized nodes' SQNR as horizontal bars (see :meth:`chart_rows`), each
        labelled with its value; None if matplotlib is missing.

        A dashed line marks the q/dq model's output SQNR (per-node figures are measured on the
        q/dq program too); nodes more than 3 dB below it are orange; a dotted line marks the
        lowered model's output SQNR when it was lowered. About 0.24 inch per bar, at most
        ``max_bars`` bars.
        """
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Patch
        except ImportError:
            return None
        rows, title = self.chart_rows(max_bars)
        names = [_short(name) for name, _ in rows]
        values = [value for _, value in rows]
        model_qdq = self.qdq_sqnr_db if self.qdq_sqnr_db is not None else self.model_sqnr_db
        model_line = model_qdq if model_qdq is not None and math.isfinite(model_qdq) else None
        lowered_line = self.lowered_sqnr_db if self.lowered_sqnr_db is not None and math.isfinite(self.lowered_sqnr_db) else None

        figure, axes = plt.subplots(figsize=(8.0, 1.8 + 0.24 * max(len(rows), 1)))
        colors = ["tab:orange" if model_line is not None and value < model_line - CHART_MARGIN_DB else "tab:blue" for value in values]
        positions = list(range(len(rows)))
        axes.barh(positions, values, color=colors, height=0.7)
        axes.set_yticks(positions, names, fontsize=8)
        axes.set_ylim(len(rows) - 0.5, -0.5)  # first row at the top
        marks = values + ([model_line] if model_line is not None else []) + ([lowered_line] if lowered_line is not None else [])
        low, high = min(marks + [0.0]), max(marks + [1.0])
        span = high - low
        axes.set_xlim(low - (0.05 * span if low < 0 else 0), high + 0.12 * span)
        for position, value in zip(positions, values):
            axes.text(max(value, 0.0) + 0.01 * span, position, f"{value:.1f}", va="center", fontsize=7)
        if model_line is not None:
            axes.axvline(model_line, color="tab:red", linestyle="--", linewidth=1,
                         label=f"model output, q/dq program: {model_line:.1f} dB")
        if lowered_line is not None:
            axes.axvline(lowered_line, color="black", linestyle=":", linewidth=1.2,
                         label=f"model output, lowered (what runs): {lowered_line:.1f} dB")
        handles, _ = axes.get_legend_handles_labels()
        if "tab:orange" in colors:
            handles.append(Patch(color="tab:orange", label="node more than 3 dB below the q/dq model"))
        if handles:
            axes.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
        if not rows:
            axes.text(0.5, 0.5, "no quantized node with a finite SQNR", ha="center", va="center", transform=axes.transAxes)
        axes.set_xlabel("SQNR vs float (dB), measured on the q/dq program", fontsize=9)
        legend_rows = (len(handles) + 1) // 2
        axes.set_title(title, fontsize=10, pad=6 + 13 * legend_rows)
        axes.grid(axis="x", alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        return path


def _short(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _db(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f} dB"


# --------------------------------------------------------------------------- sensitivity
def sensitivity_markdown(records: list) -> str:
    """A Markdown table of ``qcore.sensitivity`` records, in rank order.

    >>> from qcore.accuracy import SensitivityRecord
    >>> print(sensitivity_markdown([SensitivityRecord(1, "linear", "linear", ("linear", "relu"), "fc", 30.0, 20.0)]))
    Output SQNR vs float with all partitions quantized: 20.0 dB. Each row: the output SQNR with only that partition kept float.
    <BLANKLINE>
    | rank | partition | nodes | module | SQNR kept float | gain |
    | --- | --- | --- | --- | --- | --- |
    | 1 | linear | linear, relu | fc | 30.0 dB | +10.0 dB |
    """
    if not records:
        return "No quantized partition."
    lines = [
        f"Output SQNR vs float with all partitions quantized: {_db(records[0].baseline_db)}. "
        "Each row: the output SQNR with only that partition kept float.",
        "",
        "| rank | partition | nodes | module | SQNR kept float | gain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(records, key=lambda r: r.rank):
        gain = "inf" if math.isinf(r.gain_db) else f"{r.gain_db:+.1f} dB"
        lines.append(f"| {r.rank} | {r.partition} | {', '.join(r.nodes)} | {r.module or '-'} | {_db(r.sqnr_db)} | {gain} |")
    return "\n".join(lines)


def write_sensitivity_chart(records: list, path: str, title: str = "Partition sensitivity", max_bars: int = CHART_MAX_BARS) -> Optional[str]:
    """A PNG of each partition's output SQNR with only it kept float (horizontal bars, rank
    order, the first ``max_bars``), a dashed line at the fully quantized model's SQNR; None if
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = sorted(records, key=lambda r: r.rank)[:max_bars]
    finite = [r.sqnr_db for r in rows if math.isfinite(r.sqnr_db)]
    top = max(finite + [r.baseline_db for r in rows if math.isfinite(r.baseline_db)] + [1.0])
    values = [r.sqnr_db if math.isfinite(r.sqnr_db) else top * 1.1 for r in rows]
    figure, axes = plt.subplots(figsize=(8.0, 1.8 + 0.28 * max(len(rows), 1)))
    positions = list(range(len(rows)))
    axes.barh(positions, values, color="tab:blue", height=0.7)
    axes.set_yticks(positions, [_short(f"{r.partition} ({r.module})" if r.module else r.partition) for r in rows], fontsize=8)
    axes.set_ylim(len(rows) - 0.5, -0.5)
    for position, record, value in zip(positions, rows, values):
        axes.text(max(value, 0.0) + 0.01 * top, position, f"{_db(record.sqnr_db)} ({record.gain_db:+.1f})", va="center", fontsize=7)
    if rows and math.isfinite(rows[0].baseline_db):
        axes.axvline(rows[0].baseline_db, color="tab:red", linestyle="--", linewidth=1,
                     label=f"all partitions quantized: {rows[0].baseline_db:.1f} dB")
        axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)
    axes.set_xlim(min(0.0, min(values + [0.0])), top * 1.25)
    axes.set_xlabel("model output SQNR vs float (dB) with only this partition kept float", fontsize=9)
    axes.set_title(title, fontsize=10, pad=20)
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_sensitivity(records: list, directory: "str | os.PathLike", title: str = "Partition sensitivity") -> str:
    """Write ``sensitivity.md`` (the table, and the chart when matplotlib is installed) and
    ``sensitivity.png`` into ``directory`` (created); returns the Markdown file's path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    chart = write_sensitivity_chart(records, os.path.join(directory, "sensitivity.png"), title=title)
    lines = [f"# {title}", "", sensitivity_markdown(records), ""]
    lines.append("![partition sensitivity](sensitivity.png)" if chart else NO_CHART_NOTE)
    path = os.path.join(directory, "sensitivity.md")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


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
    accuracy_reason = converted_node.meta.get(ACCURACY_FLOAT_KEY)
    if accuracy_reason is not None:
        return accuracy_reason
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


def folded_batch_norm(node: Node, converted_names: "set[str]") -> Optional[Node]:
    """The batch norm of the float program that convert folded into ``node``, or None.

    That is a batch norm reading ``node`` (its only user) whose output node (the batch norm or
    its ``getitem(·, 0)``) is gone from the converted program (``converted_names``): there the
    twin of ``node`` computes the value after the batch norm, so that is what it compares with.
    """
    if len(node.users) != 1:
        return None
    (bn,) = node.users
    if batch_norm_kind(bn) is None or bn.args[0] is not node or bn.name in converted_names:
        return None
    output = batch_norm_output(bn)
    if output is None or output.name in converted_names:
        return None
    return bn


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
            producer = node.args[0] if node.args else None
            if batch_norm_kind(node) is not None and isinstance(producer, Node) and producer.name in by_name:
                reason = f"folded away by convert into {producer.name} (its SQNR is taken after this batch norm)"
            else:
                reason = "folded away by convert (e.g. batch norm into conv)"
            reports.append(NodeReport(node.name, _op_name(node), False, reason))
            continue
        dequantized = [a.name for a in twin.all_input_nodes if is_dequantize(a)]
        if twin.meta.get(ACCURACY_FLOAT_KEY) is not None:
            # kept float by the accuracy target: its input may still be a dequantized activation
            reports.append(NodeReport(node.name, _op_name(node), False, twin.meta[ACCURACY_FLOAT_KEY]))
        elif dequantized:
            reports.append(NodeReport(node.name, _op_name(node), True, f"int8 inputs ({len(dequantized)} dequantized)"))
        else:
            reports.append(NodeReport(node.name, _op_name(node), False, _float_reason(twin, backend)))
    return reports


def _kernel_kind(node: Node, outputs: dict) -> str:
    """How ``node`` of a lowered program runs, judged by its data, not by whose op it is: "q/dq"
    for quantize/dequantize ops and casts of 8-bit integer data, "integer kernel" for any other
    op that reads or writes 8-bit integer tensors, else "float"."""
    if getattr(node.target, "namespace", "") == "quantized_decomposed":
        return "q/dq"
    values = [outputs.get(node.name)] + [outputs.get(arg.name) for arg in node.all_input_nodes]
    integer = any(isinstance(value, torch.Tensor) and value.dtype in _INTEGER_DTYPES for value in values)
    if not integer:
        return "float"
    return "q/dq" if _op_name(node) in _CAST_OPS else "integer kernel"


def count_kernels(lowered: GraphModule, inputs: tuple) -> list[KernelCount]:
    """The ops of ``lowered`` by kind (see :func:`_kernel_kind`), from one run on ``inputs``."""
    _, outputs = _record(lowered, inputs)
    return _count_kernels(lowered, outputs)


def _count_kernels(lowered: GraphModule, outputs: dict) -> list[KernelCount]:
    counts: dict[tuple[str, str], int] = {}
    for node in lowered.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "") in _SKIPPED_TARGETS:
            continue
        key = (_op_name(node), _kernel_kind(node, outputs))
        counts[key] = counts.get(key, 0) + 1
    order = {"integer kernel": 0, "q/dq": 1, "float": 2}
    return [KernelCount(op, kind, n) for (op, kind), n in sorted(counts.items(), key=lambda item: (order[item[0][1]], item[0][0]))]


def time_model(fn: Callable[..., Any], inputs: tuple, budget_s: float = 0.5, min_runs: int = 5) -> float:
    """Median milliseconds per call of ``fn(*inputs)`` (no grad), within about ``budget_s`` seconds."""
    times: list[float] = []
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


def _output_sqnr(reference_result: Any, result: Any) -> Optional[float]:
    reference, actual = _first_tensor(reference_result), _first_tensor(result)
    return sqnr_db(reference, actual) if reference is not None and actual is not None else None


def build_report(
    exported: GraphModule,
    converted: GraphModule,
    lowered: Optional[GraphModule],
    backend: str,
    sample_inputs: tuple,
    measure_latency: bool = True,
    training: Optional[TrainingSummary] = None,
    hardware: Optional[dict] = None,
) -> QuantizationReport:
    """Compare ``converted`` and ``lowered`` with the float ``exported`` program on ``sample_inputs``
    (``exported`` must be in eval mode: it is run, and a train-mode graph would update batch-norm
    statistics). ``model_sqnr_db`` is the lowered program's output SQNR when there is one, else the
    converted program's; per-node SQNR pairs ``exported`` and ``converted`` nodes by name.
    ``training``: how QAT trained the model, if it did; ``hardware``: what the backend says about
    the machine (recorded as given)."""
    nodes = classify_nodes(exported, converted, backend)
    float_result, float_outputs = _record(exported, sample_inputs)
    quant_result, quant_outputs = _record(converted, sample_inputs)
    exported_by_name = {node.name: node for node in exported.graph.nodes}
    converted_names = {node.name for node in converted.graph.nodes}
    with_sqnr = []
    for node in nodes:
        bn = folded_batch_norm(exported_by_name[node.name], converted_names)
        reference_name = node.name
        if bn is not None:
            bn_output = batch_norm_output(bn)
            assert bn_output is not None  # folded_batch_norm only returns a batch norm with an output node
            reference_name = bn_output.name
        reference, actual = float_outputs.get(reference_name), quant_outputs.get(node.name)
        if (
            node.quantized and reference is not None and actual is not None
            and reference.shape == actual.shape and reference.is_floating_point()
        ):
            node = attrs.evolve(node, sqnr_db=sqnr_db(reference, actual), sqnr_reference=bn.name if bn is not None else None)
        with_sqnr.append(node)
    qdq_sqnr = _output_sqnr(float_result, quant_result)
    report = QuantizationReport(
        backend=backend, nodes=with_sqnr, model_sqnr_db=qdq_sqnr, qdq_sqnr_db=qdq_sqnr,
        hardware=dict(hardware or {}), training=training,
    )
    if lowered is not None:
        lowered_result, lowered_outputs = _record(lowered, sample_inputs)
        report.lowered_sqnr_db = _output_sqnr(float_result, lowered_result)
        report.model_sqnr_db = report.lowered_sqnr_db
        report.kernels = _count_kernels(lowered, lowered_outputs)
        report.lowering_counters = dict(lowered.meta.get("qcore_lowered", {}).get("counters", {}))
    if measure_latency:
        report.latency_ms = {
            "float": time_model(exported, sample_inputs),
            "quantized": time_model(lowered if lowered is not None else converted, sample_inputs),
        }
    return report
