"""Accuracy beyond plain calibration: plain PTQ vs SmoothQuant vs bias correction vs an SQNR target.

Not a test (``tests/test_accuracy_*.py`` assert on the same experiments). For each model it
quantizes with one backend:

* torchao's plain pt2e flow (its XNNPACK quantizer, per-channel weights; the q/dq program),
  and beside it qcore's plain flow with the xnnpack backend's recipe (the same one; q/dq program);
* qcore plain, ``smooth_quant=0.5``, ``bias_correction=True``, and ``min_sqnr_db`` = plain's
  output SQNR over the calibration batches + 10 dB (``--target-gain``);

and prints side by side the output SQNR vs float on held-out inputs, the compute ops running
int8, the partitions the target kept float, and for the digits CNN the test accuracy. Models:

* ``outlier_mlp``: a transformer MLP block whose LayerNorm output has 4 of 256 channels 50x;
* ``outlier_transformer``: three such blocks (outliers 50x, none, 20x), 8 linears;
* ``digits``: the digits CNN of ``tests/test_qat_digits.py`` with 4-bit weights (-8..7),
  trained per seed (``--seeds``; mean and spread over the seeds at the end), one scale per
  output channel or, with ``--weights per-tensor`` (the harsh setting where bias correction's
  accuracy gain shows), one symmetric scale per weight tensor.

``--sensitivity-plot PATH`` also writes the sensitivity chart of ``outlier_transformer`` (the
README's figure).

    python bench/bench_accuracy.py [--backend onednn] [--models outlier_mlp digits] [--seeds 0 1 2 3 4 5]
        [--weights per-channel|per-tensor] [--skip-torchao] [--sensitivity-plot docs/images/sensitivity_outlier_transformer.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch

import qcore
from qcore import observers
from qcore.accuracy import AccuracyTargetWarning
from qcore.accuracy.examples import OutlierMLP, OutlierTransformer, outlier_mlp_data
from qcore.metrics import sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

COMPUTE_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
VARIANTS = ("torchao plain", "plain, xnnpack", "plain", "smooth_quant=0.5", "bias_correction", "min_sqnr_db")


@attrs.define
class Case:
    """One model: the float ``model``, ``calibration`` batches, ``held_out`` batches, an optional
    ``metric(model) -> %``, the weights' ``weight_range`` (None: each backend's default config) and
    whether they have a scale per output channel (``weight_per_channel``) or one per tensor."""

    name: str
    model: torch.nn.Module
    calibration: list
    held_out: list
    metric: Optional[Callable[[Any], float]] = None
    weight_range: Optional[tuple] = None  # None: the backend's default config
    weight_per_channel: bool = True

    def config(self, backend: str) -> Any:
        if self.weight_range is None:
            return None
        quantizer_class: Any = qcore.get_plugin_manager().get_backend(backend).quantizer_class
        config = quantizer_class.default_config()
        low, high = self.weight_range
        weight = attrs.evolve(config.weight, quant_min=low, quant_max=high)
        if not self.weight_per_channel:
            weight = attrs.evolve(weight, qscheme=torch.per_tensor_symmetric,
                                  observer_or_fake_quant_ctr=observers.MinMaxObserver.with_args(eps=2**-12))
        return attrs.evolve(config, weight=weight)


def output_sqnr(model: Any, quantized: Any, batches: list) -> float:
    with torch.no_grad():
        return sqnr_db(torch.cat([model(*b).flatten() for b in batches]), torch.cat([quantized(*b).flatten() for b in batches]))


def torchao_plain(case: Case) -> Any:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    low, high = case.weight_range or (-127, 127)
    config = get_symmetric_quantization_config(is_per_channel=case.weight_per_channel, weight_qmin=low, weight_qmax=high)
    exported = torch.export.export(case.model, case.calibration[0]).module()
    prepared = prepare_pt2e(exported, XNNPACKQuantizer().set_global(config))
    with torch.no_grad():
        for batch in case.calibration:
            prepared(*batch)
    return convert_pt2e(prepared)


def run_case(case: Case, backend: str, target_gain: float, skip_torchao: bool) -> dict:
    """``{variant: {"db", "int8", "float_partitions", "metric", "seconds"}}``."""
    rows: dict = {}

    def record(variant: str, model: Any, result: Any, start: float) -> None:
        row = {"db": output_sqnr(case.model, model, case.held_out), "seconds": time.perf_counter() - start,
               "int8": "-", "float_partitions": "-", "metric": None, "note": ""}
        if result is not None:
            # int8 = activation and weight both dequantized (a linear kept float may still read a dequantized activation)
            compute = [n for n in result.converted.graph.nodes if n.op == "call_function" and n.target in COMPUTE_OPS]
            int8 = [n for n in compute if all(isinstance(a, torch.fx.Node) and "dequantize" in str(a.target) for a in n.args[:2])]
            row["int8"] = f"{len(int8)}/{len(compute)}"
            row["float_partitions"] = ", ".join(d.partition for d in result.report.kept_float) or "none"
            if result.report.accuracy_target and "NOT reached" in result.report.accuracy_target:
                row["note"] = "target NOT reached"
        if case.metric is not None:
            row["metric"] = case.metric(model)
        rows[variant] = row

    if not skip_torchao:
        start = time.perf_counter()
        try:
            record("torchao plain", torchao_plain(case), None, start)
        except Exception as exc:  # a peer's limitation is a row, not a crash
            rows["torchao plain"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:80]}
    if backend != "xnnpack" and "xnnpack" in qcore.get_plugin_manager().backends():
        start = time.perf_counter()  # the recipe torchao's row uses, to compare like with like
        same_recipe = qcore.quantize(case.model, case.calibration[0], backend="xnnpack", calibration=case.calibration,
                                     config=case.config("xnnpack"), measure_latency=False, lower=False)
        record("plain, xnnpack", same_recipe.model, same_recipe, start)
    common = dict(backend=backend, calibration=case.calibration, config=case.config(backend), measure_latency=False)
    start = time.perf_counter()
    plain = qcore.quantize(case.model, case.calibration[0], **common)
    record("plain", plain.model, plain, start)
    plain_calibration_db = output_sqnr(case.model, plain.model, case.calibration)
    for variant, options in (("smooth_quant=0.5", dict(smooth_quant=0.5)), ("bias_correction", dict(bias_correction=True)),
                             ("min_sqnr_db", dict(min_sqnr_db=round(plain_calibration_db + target_gain, 1), strict=False))):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccuracyTargetWarning)  # shown in the table instead
            result = qcore.quantize(case.model, case.calibration[0], **common, **options)
        record(variant, result.model, result, start)
        if variant == "min_sqnr_db":
            rows[variant]["note"] = (f"target {options['min_sqnr_db']} dB (plain {plain_calibration_db:.1f} dB + {target_gain:g}, "
                                     f"calibration batches) " + rows[variant]["note"]).strip()
    return rows


def print_rows(title: str, rows: dict, metric_name: Optional[str]) -> None:
    print(f"\n{title}")
    header = f"  {'variant':<18} {'SQNR (dB)':>9}  {'int8':>5}  {'float partitions':<22}"
    if metric_name:
        header += f" {metric_name:>9}"
    print(header + "  note")
    for variant in VARIANTS:
        row = rows.get(variant)
        if row is None:
            continue
        if "error" in row:
            print(f"  {variant:<18} {'n/a':>9}  {row['error']}")
            continue
        line = f"  {variant:<18} {row['db']:9.2f}  {row['int8']:>5}  {row['float_partitions']:<22}"
        if metric_name:
            line += f" {row['metric']:8.2f}%"
        print(line + f"  {row['note']}")


def outlier_cases(names: list) -> list:
    calibration, held_out = outlier_mlp_data(batches=4), outlier_mlp_data(batches=4, seed=7)
    models = {"outlier_mlp": OutlierMLP, "outlier_transformer": OutlierTransformer}
    return [Case(name, models[name]().eval(), calibration, held_out) for name in names if name in models]


def digits_case(seed: int, per_channel: bool = True) -> Case:
    from test_qat_digits import BATCH, accuracy, load_digits_split, train_float

    data = load_digits_split(seed)
    model = train_float(seed, data, epochs=6)
    x_train, _, x_test, y_test = data
    return Case(
        f"digits CNN, 4-bit weights (-8..7) {'per channel' if per_channel else 'per tensor'}, seed {seed}", model,
        [(x_train[i : i + BATCH],) for i in range(0, 8 * BATCH, BATCH)],
        [(x_test[i : i + BATCH],) for i in range(0, len(x_test) - BATCH + 1, BATCH)],
        metric=lambda m: accuracy(m, x_test, y_test), weight_range=(-8, 7), weight_per_channel=per_channel,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="onednn", help="qcore backend (default onednn; reference, xnnpack)")
    parser.add_argument("--models", nargs="+", default=["outlier_mlp", "outlier_transformer", "digits"],
                        choices=["outlier_mlp", "outlier_transformer", "digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="digits training seeds")
    parser.add_argument("--weights", choices=["per-channel", "per-tensor"], default="per-channel",
                        help="digits CNN's 4-bit weights: a scale per output channel (default) or one per tensor")
    parser.add_argument("--target-gain", type=float, default=10.0, help="min_sqnr_db = plain + this (dB)")
    parser.add_argument("--skip-torchao", action="store_true")
    parser.add_argument("--sensitivity-plot", metavar="PATH", help="write outlier_transformer's sensitivity chart here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip_torchao = args.skip_torchao
    if not skip_torchao:
        try:
            import torchao  # noqa: F401
        except ImportError:
            skip_torchao = True
    print(f"backend {args.backend}; SQNR of the model's output vs float on held-out inputs; "
          f"int8 = conv/linear ops on int8 inputs; torchao: its plain pt2e flow (XNNPACKQuantizer, q/dq program)")
    for case in outlier_cases(args.models):
        print_rows(case.name, run_case(case, args.backend, args.target_gain, skip_torchao), None)
    if "digits" in args.models:
        per_seed = []
        for seed in args.seeds:
            case = digits_case(seed, per_channel=args.weights == "per-channel")
            rows = run_case(case, args.backend, args.target_gain, skip_torchao)
            float_accuracy = case.metric(case.model) if case.metric else float("nan")
            print_rows(f"{case.name} (float accuracy {float_accuracy:.2f}%)", rows, "accuracy")
            per_seed.append(rows)
        if len(per_seed) > 1:
            print(f"\ndigits CNN, 4-bit weights {args.weights}, {len(per_seed)} seeds: mean (sd)")
            for variant in VARIANTS:
                good = [rows[variant] for rows in per_seed if variant in rows and "error" not in rows[variant]]
                if len(good) == len(per_seed):
                    dbs, accs = [r["db"] for r in good], [r["metric"] for r in good]
                    print(f"  {variant:<18} SQNR {statistics.mean(dbs):6.2f} dB ({statistics.stdev(dbs):.2f})   "
                          f"accuracy {statistics.mean(accs):6.2f}% ({statistics.stdev(accs):.2f})")
            gains = [rows["bias_correction"]["metric"] - rows["plain"]["metric"] for rows in per_seed]
            gains_db = [rows["bias_correction"]["db"] - rows["plain"]["db"] for rows in per_seed]
            print(f"  bias correction vs plain: accuracy {statistics.mean(gains):+.2f} points (sd {statistics.stdev(gains):.2f}, "
                  f"standard error {statistics.stdev(gains) / len(gains) ** 0.5:.2f}), "
                  f"higher on {sum(g > 0 for g in gains)}, equal on {sum(g == 0 for g in gains)}, "
                  f"lower on {sum(g < 0 for g in gains)} of {len(gains)} seeds; SQNR {statistics.mean(gains_db):+.2f} dB "
                  f"(sd {statistics.stdev(gains_db):.2f})")
    if args.sensitivity_plot:
        from qcore.app.report import sensitivity_markdown, write_sensitivity_chart

        calibration = outlier_mlp_data(batches=4)
        records = qcore.sensitivity(OutlierTransformer().eval(), calibration[0], backend=args.backend, calibration=calibration)
        Path(args.sensitivity_plot).parent.mkdir(parents=True, exist_ok=True)
        write_sensitivity_chart(records, args.sensitivity_plot, title=f"outlier_transformer sensitivity ({args.backend})")
        print(f"\noutlier_transformer sensitivity ({args.backend}), chart written to {args.sensitivity_plot}:")
        print(sensitivity_markdown(records))


if __name__ == "__main__":
    main()
