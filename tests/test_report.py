"""The quantization report: node decisions and reasons, SQNR pairing by node name, the model's
SQNR measured on the program that runs (lowered) beside the q/dq one's, the hardware line,
Markdown and PNG (readable for a 300-node model), explain, demo fallback."""

from __future__ import annotations

import io
import types
import math
import struct
from pathlib import Path

import pytest
import torch

import qcore
from qcore.testing import requires_backend
from qcore.graph_copy import copy_graph_module
from qcore.app.report import NodeReport, QuantizationReport, build_report, sqnr_db


class Mixed(torch.nn.Module):
    """linear (int8 for onednn) -> sigmoid (no onednn annotator: stays float) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x)))


@pytest.fixture(scope="module")
def mixed_result():
    torch.manual_seed(0)
    calibration = [(torch.randn(4, 8),) for _ in range(4)]
    return qcore.quantize(Mixed().eval(), calibration[0], backend="onednn", calibration=calibration)


@requires_backend("onednn")
def test_nodes_say_quantized_or_float_and_why(mixed_result):
    nodes = {n.name: n for n in mixed_result.report.nodes}
    assert nodes["linear"].quantized and nodes["linear_1"].quantized
    assert not nodes["sigmoid"].quantized
    assert nodes["sigmoid"].reason == "no onednn annotator handles aten.sigmoid"
    assert nodes["sigmoid"].sqnr_db is None


@requires_backend("onednn")
def test_node_sqnr_pairs_float_and_quantized_nodes_by_name(mixed_result):
    x = torch.randn(4, 8)
    exported, converted = mixed_result.exported, mixed_result.converted
    from qcore.app.report import _record

    _, float_outputs = _record(exported, (x,))
    _, quant_outputs = _record(converted, (x,))
    # the report's numbers come from the first calibration batch; recompute the pairing on x
    assert set(float_outputs) & set(quant_outputs) >= {"linear", "sigmoid", "linear_1"}
    assert 15 < sqnr_db(float_outputs["linear"], quant_outputs["linear"]) < 80
    report = mixed_result.report
    assert all(20 < n.sqnr_db < 80 for n in report.nodes if n.quantized)
    assert 20 < report.model_sqnr_db < 80


def test_sqnr_db_edge_cases():
    x = torch.randn(10)
    assert sqnr_db(x, x) == math.inf
    assert abs(sqnr_db(torch.ones(4), torch.ones(4) * 1.1) - 20.0) < 1e-4


@requires_backend("onednn")
def test_latency_and_speedup(mixed_result):
    latency = mixed_result.report.latency_ms
    assert latency["float"] > 0 and latency["quantized"] > 0
    assert mixed_result.report.speedup == pytest.approx(latency["float"] / latency["quantized"])


@requires_backend("onednn")
def test_write_markdown_and_png(mixed_result, tmp_path):
    mixed_result.report.accuracy = {"float": 0.9, "quantized": 0.875}
    path = mixed_result.report.write(tmp_path / "out")
    markdown = Path(path).read_text(encoding="utf-8")
    assert "| accuracy | 90.00% | 87.50% |" in markdown
    assert "| sigmoid | aten.sigmoid | float | no onednn annotator handles aten.sigmoid | - |" in markdown
    assert "![per-node SQNR](sqnr.png)" in markdown
    assert "| `onednn.qlinear_pointwise` | integer kernel | 2 |" in markdown
    assert "| `aten.sigmoid` | float | 1 |" in markdown
    png = (tmp_path / "out" / "sqnr.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


@requires_backend("onednn")
def test_explain_names_integer_kernels_and_float_ops(mixed_result):
    text = mixed_result.report.explain()
    assert "integer kernels: onednn.qlinear_pointwise x2" in text
    assert "float ops: aten.sigmoid x1" in text
    assert "sigmoid (aten.sigmoid): float: no onednn annotator handles aten.sigmoid" in text


@requires_backend("xnnpack")
def test_demo_falls_back_to_xnnpack_without_onednn(monkeypatch, fresh_plugin_manager, tmp_path):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "onednn")
    from qcore.app.demo import run_digits_demo

    out = io.StringIO()
    result = run_digits_demo(report_dir=str(tmp_path / "rep"), out=out)
    text = out.getvalue()
    assert result.backend == "xnnpack"  # preference 10 beats the reference backend's 0
    assert "quantized with backend xnnpack:" in text and "kept as the q/dq program" in text
    assert (tmp_path / "rep" / "report.md").exists()


GPU_ONLY_PLUGIN = types.SimpleNamespace(
    qcore_register_backends=qcore.hookimpl(
        lambda: [qcore.Backend(name="gpu_only", quantizer_class=object, preference=1000, is_available=lambda: "needs a GPU")]
    )
)


def test_auto_backend_skips_an_unavailable_preferred_one_and_says_why(register_qcore_plugin):
    from qcore.app.demo import pick_backend

    register_qcore_plugin(GPU_ONLY_PLUGIN, "gpu_only_plugin")
    name, note = pick_backend("auto")
    assert name != "gpu_only" and note.startswith(" (gpu_only unavailable: needs a GPU")


# --------------------------------------------------------------------------- the model that runs
@requires_backend("onednn")
def test_model_sqnr_is_measured_on_the_lowered_program(mixed_result):
    exported, converted, lowered = mixed_result.exported, mixed_result.converted, mixed_result.lowered
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
    report = build_report(exported, converted, lowered, "onednn", x, measure_latency=False)
    with torch.no_grad():
        reference = exported(*x)
        assert report.lowered_sqnr_db == pytest.approx(sqnr_db(reference, lowered(*x)), abs=1e-6)
        assert report.qdq_sqnr_db == pytest.approx(sqnr_db(reference, converted(*x)), abs=1e-6)
    assert report.model_sqnr_db == report.lowered_sqnr_db


def _scaled_output(module, factor: float):
    """A copy of ``module`` whose first output is multiplied by ``factor``: a lowering bug."""
    broken, _ = copy_graph_module(module)
    output = next(node for node in broken.graph.nodes if node.op == "output")
    results = output.args[0]
    first = results[0] if isinstance(results, (tuple, list)) else results
    with broken.graph.inserting_before(output):
        scaled = broken.graph.call_function(torch.ops.aten.mul.Tensor, (first, factor))
    output.args = ((scaled, *results[1:]) if isinstance(results, (tuple, list)) else scaled,)
    broken.recompile()
    return broken


@requires_backend("onednn")
def test_a_lowering_error_shows_in_the_model_sqnr_not_hidden_behind_the_qdq_figure(mixed_result):
    broken = _scaled_output(mixed_result.lowered, 1.1)  # 10% off everywhere: at most 20 dB
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
    report = build_report(mixed_result.exported, mixed_result.converted, broken, "onednn", x, measure_latency=False)
    assert report.lowered_sqnr_db < 20.5 and report.qdq_sqnr_db > 25
    assert report.model_sqnr_db == report.lowered_sqnr_db
    markdown = report.to_markdown()
    assert f"- Model output SQNR vs float (lowered, what runs): {report.lowered_sqnr_db:.1f} dB\n" in markdown
    assert f"  - q/dq program: {report.qdq_sqnr_db:.1f} dB\n" in markdown


@requires_backend("onednn")
def test_without_lowering_the_model_sqnr_is_the_qdq_programs(mixed_result):
    x = (torch.randn(4, 8, generator=torch.Generator().manual_seed(1)),)
    report = build_report(mixed_result.exported, mixed_result.converted, None, "onednn", x, measure_latency=False)
    assert report.lowered_sqnr_db is None and report.kernels == []
    assert report.model_sqnr_db == report.qdq_sqnr_db > 20
    markdown = report.to_markdown()
    assert f"- Model output SQNR vs float (q/dq program, not lowered): {report.qdq_sqnr_db:.1f} dB\n" in markdown
    assert "lowered, what runs" not in markdown


@requires_backend("onednn")
def test_markdown_and_explain_give_the_lowered_and_the_qdq_sqnr(mixed_result):
    report = mixed_result.report
    assert report.lowered_sqnr_db is not None and report.model_sqnr_db == report.lowered_sqnr_db
    lowered, qdq = f"{report.lowered_sqnr_db:.1f} dB", f"{report.qdq_sqnr_db:.1f} dB"
    markdown = report.to_markdown()
    assert f"- Model output SQNR vs float (lowered, what runs): {lowered}\n  - q/dq program: {qdq}\n" in markdown
    assert "Per-node SQNR is measured on the q/dq program (convert's output), not on the lowered one" in markdown
    assert f"  model output SQNR vs float (lowered, what runs): {lowered}; q/dq program: {qdq}" in report.explain()


# --------------------------------------------------------------------------- hardware
AVX2_FACTS = {
    "name": "AMD EPYC",
    "capability": "AVX2",
    "int8_kernel": "avx2",
    "int8_pair_sums_saturate": True,
    "native_bf16": False,
}


@requires_backend("onednn")
def test_build_report_records_the_hardware_as_given(mixed_result):
    facts = dict(AVX2_FACTS, describe="AMD EPYC: AVX2 without VNNI, int8 pair sums saturate (7-bit weights)")
    x = (torch.randn(4, 8),)
    report = build_report(mixed_result.exported, mixed_result.converted, None, "onednn", x, measure_latency=False, hardware=facts)
    assert report.hardware == facts and report.hardware is not facts
    assert "\nHardware: AMD EPYC: AVX2 without VNNI, int8 pair sums saturate (7-bit weights)\n" in report.to_markdown()
    assert "  hardware: AMD EPYC: AVX2 without VNNI" in report.explain()


def test_hardware_without_describe_is_printed_as_key_value_pairs():
    report = QuantizationReport(backend="somebackend", nodes=[], model_sqnr_db=None, hardware=dict(AVX2_FACTS))
    line = "Hardware: name=AMD EPYC, capability=AVX2, int8_kernel=avx2, int8_pair_sums_saturate=True, native_bf16=False"
    assert f"\n{line}\n" in report.to_markdown()


def test_no_hardware_no_hardware_line():
    report = QuantizationReport(backend="somebackend", nodes=[], model_sqnr_db=None)
    assert report.hardware == {}
    assert "Hardware" not in report.to_markdown() and "hardware" not in report.explain()


# --------------------------------------------------------------------------- the chart
def synthetic_report(count: int) -> QuantizationReport:
    """``count`` quantized convs with distinct SQNRs from 10.0 to 39.9 dB, each followed by a float relu."""
    nodes = []
    for index in range(count):
        value = 10 + (index * 7919 % 300) / 10
        nodes.append(NodeReport(f"layer{index}_conv2d", "aten.conv2d", True, "int8 inputs (2 dequantized)", sqnr_db=value))
        nodes.append(NodeReport(f"layer{index}_relu", "aten.relu", False, "fused into the int8 partition"))
    nodes.append(NodeReport("exact", "aten.add", True, "int8 inputs (2 dequantized)", sqnr_db=math.inf))
    return QuantizationReport(backend="onednn", nodes=nodes, model_sqnr_db=30.0, qdq_sqnr_db=31.5, lowered_sqnr_db=30.0)


def _png_size(path) -> tuple[int, int]:
    header = Path(path).read_bytes()[:24]
    assert header.startswith(b"\x89PNG\r\n\x1a\n") and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_chart_of_a_300_node_model_shows_the_worst_40_worst_first():
    report = synthetic_report(300)
    rows, title = report.chart_rows()
    finite = sorted(n.sqnr_db for n in report.nodes if n.sqnr_db is not None and math.isfinite(n.sqnr_db))
    assert len(finite) == 300
    assert [value for _, value in rows] == finite[:40]
    assert rows[0] == ("layer0_conv2d", 10.0)
    assert title == "Per-node SQNR (onednn): worst 40 of 300 nodes, worst first"


def test_chart_of_a_small_model_shows_every_node_in_graph_order():
    report = synthetic_report(5)
    rows, title = report.chart_rows()
    assert [name for name, _ in rows] == [f"layer{index}_conv2d" for index in range(5)]  # the inf one is left out
    assert title == "Per-node SQNR (onednn): 5 nodes, in graph order"


def test_chart_png_height_is_bounded_for_300_nodes(tmp_path):
    pytest.importorskip("matplotlib")
    big = synthetic_report(300).write_chart(str(tmp_path / "big.png"))
    small = synthetic_report(5).write_chart(str(tmp_path / "small.png"))
    (big_width, big_height), (small_width, small_height) = _png_size(big), _png_size(small)
    assert big_width == small_width == 800
    assert 900 < big_height <= 1200  # 40 bars, not 300
    assert small_height < 450
