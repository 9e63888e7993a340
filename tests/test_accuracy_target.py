"""``qcore.quantize(min_sqnr_db=...)``: the fewest partitions float, greedy by sensitivity and
re-measured, until the output SQNR of what runs (the lowered model for onednn) reaches the
target; the report says what stayed float and why; an unreachable target is one line naming
the best SQNR reached, or a warning with ``strict=False``.

Every figure is checked against an oracle: the same flow quantized by hand with the named
partitions kept float (``prepare_flow(...).sqnr_db(keep)``), or the SQNR of the returned model
recomputed here from its outputs.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import qcore
from qcore.accuracy import AccuracyTargetError, AccuracyTargetWarning
from qcore.accuracy.examples import OutlierMLP, OutlierTransformer, outlier_mlp_data
from qcore.app.cli import main
from qcore.app.quantize import prepare_flow
from qcore.errors import QuantizeError
from qcore.metrics import sqnr_db
from qcore.testing import requires_backend

BACKENDS = ["reference", pytest.param("onednn", marks=requires_backend("onednn"))]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the figures do not depend on the machine's load
    yield
    torch.set_num_threads(threads)


def measured_sqnr(model: torch.nn.Module, quantized: torch.nn.Module, batches: list) -> float:
    """The oracle: output SQNR of ``quantized`` vs ``model`` over all ``batches`` at once."""
    with torch.no_grad():
        reference = torch.cat([model(*b).flatten() for b in batches])
        actual = torch.cat([quantized(*b).flatten() for b in batches])
    return sqnr_db(reference, actual)


def linear_states(result) -> dict:
    """``{linear node name: "int8" | "float"}`` from the report."""
    return {n.name: ("int8" if n.quantized else "float") for n in result.report.nodes if n.op == "aten.linear"}


def float_linears_in_what_runs(result) -> int:
    return sum(1 for n in result.model.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default
               and not any("dequantize" in str(a.target) for a in n.all_input_nodes))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_target_10_db_above_plain_ptq_keeps_only_the_outlier_linear_float(backend):
    model = OutlierMLP().eval()
    state = copy.deepcopy(model.state_dict())
    calibration = outlier_mlp_data(batches=4)
    plain = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, measure_latency=False)
    plain_db = measured_sqnr(model, plain.model, calibration)
    result = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, measure_latency=False,
                            min_sqnr_db=plain_db + 10.0)
    reached_db = measured_sqnr(model, result.model, calibration)
    print(f"\n{backend}: plain PTQ {plain_db:.2f} dB, target {plain_db + 10:.2f} dB, reached {reached_db:.2f} dB")
    assert reached_db >= plain_db + 10.0
    # one linear of four float (a quarter): fc1, the one reading the LayerNorm output with the outliers;
    # onednn fuses its gelu (one partition), the reference backend quantizes the gelu's output apart
    nodes = ("linear_1", "gelu") if backend == "onednn" else ("linear_1",)
    assert [(d.partition, d.nodes, d.step) for d in result.report.kept_float] == [("linear_1", nodes, 1)]
    assert linear_states(result) == {"linear": "int8", "linear_1": "float", "linear_2": "int8", "linear_3": "int8"}
    decision = result.report.kept_float[0]
    assert decision.before == pytest.approx(plain_db, abs=1e-9)
    assert decision.after == pytest.approx(reached_db, abs=1e-9)
    if backend == "onednn":  # measured on the lowered model: three int8 linear kernels and the float one
        assert result.lowered is not None and result.model is result.lowered
        kernels = {k.op: k.count for k in result.report.kernels}
        assert kernels["onednn.qlinear_pointwise"] == 3 and kernels["aten.linear"] == 1
    assert float_linears_in_what_runs(result) == 1
    # the report: the target line, what stayed float and why, on the nodes too
    target = f"min_sqnr_db={plain_db + 10.0:.6g}"
    assert result.report.accuracy_target == (
        f"{target} reached: output SQNR {reached_db:.1f} dB over 4 calibration batches with 1 of 4 partitions float"
    )
    why = (f"the most sensitive remaining partition (output SQNR {plain_db:.1f} dB -> {reached_db:.1f} dB kept float; "
           f"target {plain_db + 10.0:.6g} dB)")
    assert decision.why == why
    explained = result.report.explain()
    assert f"  kept float: linear_1 ({', '.join(nodes)}), step 1: {why}" in explained
    assert f"  linear_1 (aten.linear): float: kept float by the accuracy target, step 1: {why}" in explained
    assert f"| 1 | linear_1 | {', '.join(nodes)} | {plain_db:.4g} | {reached_db:.4g} | {why} |" in result.report.to_markdown()
    assert [r.partition for r in result.report.sensitivity][:1] == ["linear_1"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_search_re_measures_and_finds_the_linear_hidden_behind_the_first(backend):
    """blocks.2.fc1 (20x outliers) gains < 1 dB alone: blocks.0.fc1's error (50x) hides it.
    Once blocks.0.fc1 is float, re-measuring shows it; the target needs both, and 2 of 8 is the fewest."""
    model = OutlierTransformer().eval()
    calibration = outlier_mlp_data(batches=4)
    flow = prepare_flow(model, calibration[0], backend, calibration=calibration)
    plain_db = flow.sqnr_db({})
    target_db = plain_db + 10.0
    result = qcore.quantize(model, calibration[0], backend=backend, calibration=calibration, measure_latency=False,
                            min_sqnr_db=target_db)
    first = {r.partition: r for r in result.report.sensitivity}
    assert len(first) == 8 and result.report.sensitivity[0].partition == "linear_1"
    assert first["linear_1"].module == "blocks.0.fc1" and first["linear_5"].module == "blocks.2.fc1"
    assert first["linear_5"].gain_db < 1.0  # the first ranking does not see it
    assert all(r.sqnr_db < target_db for r in first.values())  # no single partition float is enough
    steps = result.report.kept_float
    assert [(d.partition, d.step) for d in steps] == [("linear_1", 1), ("linear_5", 2)]
    assert steps[0].after == pytest.approx(first["linear_1"].sqnr_db, abs=1e-9)
    assert steps[1].before == steps[0].after
    assert steps[1].after - steps[1].before > 5.0  # re-measured: now it matters
    both = {name: "x" for d in steps for name in d.nodes}
    assert steps[1].after == pytest.approx(flow.sqnr_db(both), abs=1e-9)
    assert measured_sqnr(model, result.model, calibration) == pytest.approx(steps[1].after, abs=1e-6)
    assert steps[1].after >= target_db
    assert sum(1 for state in linear_states(result).values() if state == "float") == 2  # a quarter of the 8 linears
    print(f"\n{backend}: plain {plain_db:.2f} dB; step 1 {steps[0].after:.2f} dB; step 2 {steps[1].after:.2f} dB "
          f"(blocks.2.fc1 alone: +{first['linear_5'].gain_db:.2f} dB)")


def test_a_target_already_met_keeps_everything_quantized():
    model = OutlierMLP().eval()
    calibration = outlier_mlp_data(batches=3)
    plain = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, measure_latency=False)
    plain_db = measured_sqnr(model, plain.model, calibration)
    result = qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, measure_latency=False,
                            min_sqnr_db=plain_db - 1.0)
    assert result.report.kept_float == [] and result.report.sensitivity == []
    assert result.report.accuracy_target.endswith("reached: output SQNR " + f"{plain_db:.1f} dB over 3 calibration batches with 0 of 4 partitions float")
    x = calibration[0][0]
    assert torch.equal(result.model(x), plain.model(x))


def test_an_unreachable_target_is_one_line_naming_the_best_sqnr():
    model = OutlierMLP().eval()
    calibration = outlier_mlp_data(batches=3)
    with pytest.raises(AccuracyTargetError) as caught:
        qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, measure_latency=False,
                       min_sqnr_db=200.0)
    message = str(caught.value)
    assert "\n" not in message
    match = re.fullmatch(
        r"min_sqnr_db=200\.0 not reached: the best output SQNR was (\d+\.\d) dB with 3 of 4 partitions float "
        r"\(([a-z_0-9, ]+)\); lower the target, allow more float partitions \(max_float=3\), or pass strict=False to keep the best",
        message,
    )
    assert match, message
    kept = match.group(2).split(", ")
    assert kept[0] == "linear_1" and len(set(kept)) == 3
    # the oracle: the same three partitions kept float by hand
    flow = prepare_flow(model, calibration[0], "reference", calibration=calibration)
    nodes = {p.name: p.nodes for p in flow.partitions()}
    best = flow.sqnr_db({name: "x" for partition in kept for name in nodes[partition]})
    assert float(match.group(1)) == pytest.approx(best, abs=0.051)
    with pytest.raises(AccuracyTargetError, match=r"^min_sqnr_db=200\.0 not reached: the best output SQNR was [\d.]+ dB with 1 of 4 "
                                                   r"partitions float \(linear_1\); .*\(max_float=1\)"):
        qcore.quantize(model, calibration[0], backend="reference", calibration=calibration, measure_latency=False,
                       min_sqnr_db=200.0, max_float=1)


@requires_backend("onednn")
def test_strict_false_warns_and_keeps_the_best_lowered_model():
    model = OutlierMLP().eval()
    calibration = outlier_mlp_data(batches=3)
    with pytest.warns(AccuracyTargetWarning, match=r"^min_sqnr_db=200\.0 not reached: the best output SQNR was ([\d.]+) dB with 2 of 4 "
                                                    r"partitions float \(linear_1, linear_[023]\)") as record:
        result = qcore.quantize(model, calibration[0], backend="onednn", calibration=calibration, measure_latency=False,
                                min_sqnr_db=200.0, max_float=2, strict=False)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    best = float(re.search(r"was ([\d.]+) dB", str(record[0].message)).group(1))
    reached = measured_sqnr(model, result.model, calibration)
    assert result.lowered is not None and reached == pytest.approx(best, abs=0.051)
    assert [d.step for d in result.report.kept_float] == [1, 2]
    assert result.report.accuracy_target == (
        f"min_sqnr_db=200.0 NOT reached (strict=False: kept the best): output SQNR {reached:.1f} dB over 3 calibration "
        f"batches with 2 of 4 partitions float"
    )
    assert float_linears_in_what_runs(result) == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(min_sqnr_db="35"), r"^min_sqnr_db must be a finite number of dB \(e.g. 35.0\), got '35'$"),
        (dict(min_sqnr_db=float("nan")), r"^min_sqnr_db must be a finite number of dB \(e.g. 35.0\), got nan$"),
        (dict(min_sqnr_db=True), r"^min_sqnr_db must be a finite number of dB"),
        (dict(min_sqnr_db=30.0, max_float=-1), r"^max_float must be None or an integer >= 0 .*, got -1$"),
        (dict(min_sqnr_db=30.0, max_float=1.5), r"^max_float must be None or an integer >= 0 .*, got 1.5$"),
        (dict(min_sqnr_db=30.0, strict="no"), r"^strict must be True or False, got 'no'$"),
        (dict(min_sqnr_db=30.0, qat=True, qat_epochs=1), r"^smooth_quant, bias_correction, algorithms=, min_sqnr_db and accuracy_fn apply to post-training"),
    ],
)
def test_bad_target_arguments_are_one_line_errors(options, message):
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    batch = (torch.randn(4, 8), torch.randint(0, 4, (4,)))
    calibration = [batch] if options.get("qat") else None
    with pytest.raises(QuantizeError, match=message):
        qcore.quantize(model, batch[:1], backend="reference", calibration=calibration, measure_latency=False, **options)


USER_MODULE = """
from qcore.accuracy.examples import OutlierMLP, outlier_mlp_data

def make_model():
    return OutlierMLP().eval()

def batches():
    return [b[0] for b in outlier_mlp_data(batches=3)]
"""


def test_cli_min_sqnr_unreachable_is_one_line_on_stderr(capsys, tmp_path):
    (tmp_path / "qcore_target_user.py").write_text(USER_MODULE)
    spec = str(tmp_path / "qcore_target_user.py")
    code = main(["quantize", f"{spec}:make_model", "--backend", "reference", "--calibration", f"{spec}:batches",
                 "--min-sqnr", "200", "--out", str(tmp_path / "model.pt2")])
    out, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcore: error: min_sqnr_db=200.0 not reached: the best output SQNR was "), err
    assert not (tmp_path / "model.pt2").exists()


@requires_backend("onednn")
def test_the_readme_accuracy_example_runs_and_keeps_fc1_float(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Accuracy: sensitivity, an SQNR target, SmoothQuant, bias correction\n", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    names: dict = {}
    exec(compile(block, "README.md accuracy example", "exec"), names)
    assert names["records"][0].module == "fc1"
    assert [d.partition for d in names["result"].report.kept_float] == ["linear_1"]
    assert "kept float: linear_1 (linear_1, gelu), step 1: the most sensitive" in capsys.readouterr().out
    assert names["smoothed"].report.algorithms[0].startswith("smooth_quant alpha=0.5: smoothed the input of linear_1")


@requires_backend("onednn")
def test_the_target_is_searched_on_top_of_smooth_quant():
    """With SmoothQuant first, the same target needs no float partition at all (the search builds
    every candidate from the smoothed graph, and measures it against the user's float model)."""
    model = OutlierMLP().eval()
    calibration = outlier_mlp_data(batches=4)
    plain_db = prepare_flow(model, calibration[0], "onednn", calibration=calibration).sqnr_db({})
    result = qcore.quantize(model, calibration[0], backend="onednn", calibration=calibration, measure_latency=False,
                            min_sqnr_db=plain_db + 10.0, smooth_quant=0.5)
    assert result.report.kept_float == []
    assert result.report.algorithms[0].startswith("smooth_quant alpha=0.5: smoothed the input of linear_1")
    assert measured_sqnr(model, result.model, calibration) >= plain_db + 10.0
    assert linear_states(result) == {"linear": "int8", "linear_1": "int8", "linear_2": "int8", "linear_3": "int8"}
