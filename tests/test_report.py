"""The quantization report: node decisions and reasons, SQNR pairing by node name, Markdown and PNG, explain, demo fallback."""

from __future__ import annotations

import io
import math

import pytest
import torch

import qcore
from qcore.report import sqnr_db


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


def test_nodes_say_quantized_or_float_and_why(mixed_result):
    nodes = {n.name: n for n in mixed_result.report.nodes}
    assert nodes["linear"].quantized and nodes["linear_1"].quantized
    assert not nodes["sigmoid"].quantized
    assert nodes["sigmoid"].reason == "no onednn annotator handles aten.sigmoid"
    assert nodes["sigmoid"].sqnr_db is None


def test_node_sqnr_pairs_float_and_quantized_nodes_by_name(mixed_result):
    x = torch.randn(4, 8)
    exported, converted = mixed_result.exported, mixed_result.converted
    from qcore.report import _record

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


def test_latency_and_speedup(mixed_result):
    latency = mixed_result.report.latency_ms
    assert latency["float"] > 0 and latency["quantized"] > 0
    assert mixed_result.report.speedup == pytest.approx(latency["float"] / latency["quantized"])


def test_write_markdown_and_png(mixed_result, tmp_path):
    mixed_result.report.accuracy = {"float": 0.9, "quantized": 0.875}
    path = mixed_result.report.write(tmp_path / "out")
    markdown = open(path).read()
    assert "| accuracy | 90.00% | 87.50% |" in markdown
    assert "| sigmoid | aten.sigmoid | float | no onednn annotator handles aten.sigmoid | - |" in markdown
    assert "![per-node SQNR](sqnr.png)" in markdown
    assert "| `onednn.qlinear_pointwise` | integer kernel | 2 |" in markdown
    assert "| `aten.sigmoid` | float | 1 |" in markdown
    png = (tmp_path / "out" / "sqnr.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_explain_names_integer_kernels_and_float_ops(mixed_result):
    text = mixed_result.report.explain()
    assert "integer kernels: onednn.qlinear_pointwise x2" in text
    assert "float ops: aten.sigmoid x1" in text
    assert "sigmoid (aten.sigmoid): float: no onednn annotator handles aten.sigmoid" in text


def test_demo_falls_back_to_xnnpack_without_onednn(monkeypatch, fresh_plugin_manager, tmp_path):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "onednn")
    from qcore.demo import run_digits_demo

    out = io.StringIO()
    result = run_digits_demo(report_dir=str(tmp_path / "rep"), out=out)
    text = out.getvalue()
    assert result.backend == "xnnpack"
    assert "quantized with backend xnnpack (onednn unavailable: " in text
    assert (tmp_path / "rep" / "report.md").exists()
