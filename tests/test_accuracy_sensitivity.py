"""qcore.sensitivity: partitions (anchor + fused ops), keeping one float, the ranking on the
outlier MLP, the report's table and chart, and ``qcore sensitivity``."""

from __future__ import annotations

import copy

import pytest
import torch

import qcore
from qcore.accuracy.examples import OutlierMLP, outlier_mlp_data
from qcore.accuracy.partitions import KeepFloatQuantizer, find_partitions
from qcore.app.cli import main
from qcore.app.report import sensitivity_markdown, write_sensitivity
from qcore.testing import requires_backend
from qcore.testing.toy import ToyLinearQuantizer


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def test_partitions_name_anchor_and_fused_ops_and_keep_float_keeps_them_float():
    exported = torch.export.export(small_mlp(), (torch.randn(2, 8),)).module()
    reference = qcore.get_plugin_manager().get_backend("reference").quantizer_class
    prepared = qcore.prepare_pt2e(exported, reference().set_global(reference.default_config()))
    partitions = find_partitions(prepared)
    assert [(p.name, p.kind, p.nodes, p.module) for p in partitions] == [
        ("linear", "linear", ("linear", "relu"), "0"), ("linear_1", "linear", ("linear_1",), "2")
    ]
    kept = qcore.prepare_pt2e(exported, KeepFloatQuantizer(ToyLinearQuantizer(), {"linear_1": "because"}))
    assert [p.name for p in find_partitions(kept)] == ["linear"]
    kept(torch.randn(2, 8))
    converted = qcore.convert_pt2e(kept)
    linear_1 = next(n for n in converted.graph.nodes if n.name == "linear_1")
    assert not any("dequantize" in str(a.target) for a in linear_1.all_input_nodes)


def test_keep_float_of_a_missing_node_is_a_clear_error():
    exported = torch.export.export(small_mlp(), (torch.randn(2, 8),)).module()
    with pytest.raises(ValueError, match=r"KeepFloatQuantizer: no node named 'nope' in the model"):
        qcore.prepare_pt2e(exported, KeepFloatQuantizer(ToyLinearQuantizer(), {"nope": "x"}))


def test_sensitivity_on_reference_measures_each_partition_float_and_leaves_the_model_alone():
    model = small_mlp()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(4, 8),) for _ in range(3)]
    records = qcore.sensitivity(model, batches[0], backend="reference", calibration=batches)
    assert sorted(r.partition for r in records) == ["linear", "linear_1"]
    assert [r.rank for r in records] == [1, 2]
    assert records[0].sqnr_db >= records[1].sqnr_db
    # the oracle: quantize with that partition kept float by hand, measure the same way
    from qcore.app.quantize import prepare_flow

    flow = prepare_flow(model, batches[0], "reference", calibration=batches)
    for record in records:
        assert record.sqnr_db == pytest.approx(flow.sqnr_db({name: "x" for name in record.nodes}), abs=1e-9)
        assert record.baseline_db == pytest.approx(flow.sqnr_db({}), abs=1e-9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", [pytest.param("onednn", marks=requires_backend("onednn")),
                                     pytest.param("xnnpack", marks=requires_backend("xnnpack"))])
def test_sensitivity_ranks_the_outlier_linear_first(backend):
    batches = outlier_mlp_data(batches=4)
    records = qcore.sensitivity(OutlierMLP().eval(), batches[0], backend=backend, calibration=batches)
    assert len(records) == 4 and {r.kind for r in records} == {"linear"}
    assert records[0].partition == "linear_1" and records[0].module == "fc1"
    assert records[0].gain_db > 10.0  # fc1 reads the LayerNorm output with the outliers
    assert all(abs(r.gain_db) < 2.0 for r in records[1:])


def test_sensitivity_markdown_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from qcore.accuracy import SensitivityRecord

    records = [SensitivityRecord(2, "linear", "linear", ("linear",), "proj", 20.5, 20.0),
               SensitivityRecord(1, "linear_1", "linear", ("linear_1", "gelu"), "fc1", 34.0, 20.0)]
    table = sensitivity_markdown(records)
    assert table.splitlines()[-2:] == [
        "| 1 | linear_1 | linear_1, gelu | fc1 | 34.0 dB | +14.0 dB |",
        "| 2 | linear | linear | proj | 20.5 dB | +0.5 dB |",
    ]
    path = write_sensitivity(records, tmp_path / "out")
    assert (tmp_path / "out" / "sensitivity.png").read_bytes().startswith(b"\x89PNG")
    with open(path) as handle:
        assert "![partition sensitivity](sensitivity.png)" in handle.read()


USER_MODULE = """
import torch

def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()

def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 8, generator=g) for _ in range(3)]
"""


def test_cli_sensitivity_prints_the_table_and_writes_the_report(capsys, tmp_path):
    (tmp_path / "qcore_sensitivity_user.py").write_text(USER_MODULE)
    spec = str(tmp_path / "qcore_sensitivity_user.py")
    code = main(["sensitivity", f"{spec}:make_model", "--backend", "reference", "--calibration", f"{spec}:batches",
                 "--report", str(tmp_path / "rep")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("partition sensitivity for reference:\n")
    rows = [line for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [row.split(" | ")[1] for row in rows] in (["linear", "linear_1"], ["linear_1", "linear"])
    assert (tmp_path / "rep" / "sensitivity.md").is_file()
