"""The ``qcore`` command: argument parsing and the subcommands (the work lives beside this file).

    qcore plugins            a table for people: plugin, distribution, version, status, hooks, backends
    qcore plugins --json     the same for tools: a JSON list of objects
    qcore demo               train a small CNN on the digits data set, quantize it for the backend
                             that prefers to run here, print float vs int8 accuracy and latency,
                             write a report
    qcore demo --quantizer Q the step-by-step MLP walkthrough with quantizer Q (auto, toy, or a
                             backend name)
    qcore demo --qat         the digits demo, plus quantization-aware training next to PTQ
    qcore quantize PKG.MODULE:FACTORY --calibration PKG.MODULE:LOADER --out model.pt2 [--report DIR]
    qcore quantize ... --qat [--qat-epochs N] [--qat-lr X] [--qat-loss L]
                             quantization-aware training on the LOADER's (inputs..., target) batches
    qcore quantize ... --smooth-quant ALPHA --bias-correction --min-sqnr DB
                             SmoothQuant, bias correction, keep the fewest partitions float that reach DB
    qcore explain PKG.MODULE:FACTORY [--calibration ...]   which ops become integer kernels, and why
    qcore sensitivity PKG.MODULE:FACTORY [--calibration ...] [--report DIR]
                             rank the quantized partitions by the output SQNR with only that one float
    torchrun --nproc-per-node N -m qcore quantize ...
                             calibrate on N processes (each its shard of the batches, statistics
                             synced); rank 0 writes the output and report, the others exit 0
    qcore --debug ...        show the full traceback of an error

Exit codes: 0 success, 1 an error (one line on stderr, no traceback unless ``--debug``),
2 a usage error (unknown subcommand, bad arguments).

This module imports only the standard library at import time; the plugin manager, torch work
and the demo model load inside the subcommands.

>>> main(["plugins", "--json"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Iterator, Optional, Sequence, TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


# --------------------------------------------------------------------------- qcore plugins
def run_plugins(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from qcore.app.plugin_table import format_plugin_table, plugin_rows

    rows, messages = plugin_rows()
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        for message in messages:
            err.write(f"qcore: warning: {message}\n")
        out.write(format_plugin_table(rows) + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------- qcore demo
def run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Without ``--quantizer``: the digits demo (``qcore.app.demo``); with it: the MLP walkthrough."""
    if args.quantizer is not None:
        from qcore.app.demo import run_mlp_walkthrough

        run_mlp_walkthrough(args.quantizer, batches=args.batches, seed=args.seed, out=out)
        return EXIT_OK
    from qcore.app.demo import run_digits_demo

    run_digits_demo(
        report_dir=args.report, backend=args.backend, seed=args.seed, out=out, progress=_progress(args), qat=args.qat
    )
    return EXIT_OK


# --------------------------------------------------------------------------- qcore quantize / explain
def _progress(args: argparse.Namespace) -> Any:
    """A tqdm wrapper for ``qcore.quantize(progress=...)`` when stdout is a terminal, else None."""
    if getattr(args, "quiet", False) or not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        sys.stderr.write("qcore: note: no progress bars: tqdm is not installed (pip install tqdm, or qcore[progress])\n")
        return None

    stream = sys.stderr

    def progress(iterable: Any, desc: str) -> Any:
        unit = "batch" if desc == "calibrate" or desc.startswith("QAT epoch") else "step"
        return tqdm(iterable, desc=desc, unit=unit, file=stream, leave=False)

    return progress


def _quantize_from_args(args: argparse.Namespace) -> Any:
    import qcore
    from qcore.app.demo import pick_backend
    from qcore.app.user_objects import dynamic_batch, model_and_inputs
    from qcore.plugin_manager import get_plugin_manager

    args.backend, _ = pick_backend(args.backend)
    get_plugin_manager().get_backend(args.backend)  # an unknown backend fails before any work
    if args.qat and not args.calibration:
        from qcore.errors import CliError

        raise CliError("--qat trains on the calibration batches: give --calibration PKG.MODULE:LOADER yielding (inputs..., target)")
    model, example_inputs, calibration = model_and_inputs(args)
    if calibration is not None and args.calibration_has_labels and not args.qat:
        calibration = (batch[:-1] for batch in calibration)
    qat_options: dict = {}
    if args.qat:
        import torch

        losses = {"cross_entropy": torch.nn.functional.cross_entropy, "mse": torch.nn.functional.mse_loss}
        qat_options = dict(
            qat=True, qat_epochs=args.qat_epochs or 1, qat_lr=args.qat_lr, loss_fn=losses[args.qat_loss or "cross_entropy"]
        )
    progress = _progress(args)
    with _quiet_torch_output(not args.debug):  # an export failure is reported in one line instead
        return qcore.quantize(
            model, example_inputs, backend=args.backend, calibration=calibration,
            dynamic_shapes=dynamic_batch(example_inputs, args.dynamic_batch), progress=progress,
            target=args.target_cpu, shard_calibration=not getattr(args, "no_shard", False),
            measure_latency=_rank() == 0,  # under torchrun only rank 0 reports (and times alone)
            smooth_quant=args.smooth_quant, bias_correction=args.bias_correction, min_sqnr_db=args.min_sqnr,
            **qat_options,
        )


def _rank() -> int:
    from qcore.distributed import Collective

    return Collective(None).rank


@contextlib.contextmanager
def _quiet_torch_output(enabled: bool) -> Iterator[None]:
    """Hold back what torch prints to stderr (a failing torch.export prints partial graphs);
    replay it if the block succeeds, drop it if it raises."""
    import io

    if not enabled:
        yield
        return
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())


def run_quantize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from qcore.distributed.launch import on_rank_zero, process_group_from_environment

    # under torchrun: every rank calibrates its shard; rank 0 writes, the others wait for it
    with process_group_from_environment(timeout_s=args.dist_timeout, exit_on_failure=True) as collective:
        if collective.rank == 0:
            _check_outputs(args)  # before any work
        result = _quantize_from_args(args)
        on_rank_zero(lambda: _write_outputs(args, result), what=f"writing {args.out}")
    if collective.rank != 0:
        return EXIT_OK
    return _print_summary(args, result, out)


def _check_outputs(args: argparse.Namespace) -> None:
    from qcore.app.files import check_writable_dir, check_writable_file

    check_writable_file(args.out, "--out")
    if args.report:
        check_writable_dir(args.report, "--report")


def _write_outputs(args: argparse.Namespace, result: Any) -> None:
    import os

    from qcore.app.files import write_report_atomically

    _check_outputs(args)
    result.save(args.out)
    if args.report:
        try:
            write_report_atomically(result.report, args.report)
        except BaseException:
            os.remove(args.out)
            raise


def _print_summary(args: argparse.Namespace, result: Any, out: TextIO) -> int:
    import os

    report = result.report
    quantized = sum(1 for node in report.nodes if node.quantized)
    if report.training is not None:
        out.write(f"quantization-aware training: {report.training.describe()}\n")
    made_for = f"{args.backend} (target {args.target_cpu})" if args.target_cpu else args.backend
    out.write(f"quantized for {made_for}: {quantized} of {len(report.nodes)} compute nodes run on int8 inputs\n")
    if report.model_sqnr_db is not None:
        measured = f" (lowered, what runs; q/dq program {report.qdq_sqnr_db:.1f} dB)" if report.lowered_sqnr_db is not None else ""
        out.write(f"model output SQNR vs float: {report.model_sqnr_db:.1f} dB{measured}\n")
    for line in report.accuracy_lines():
        out.write(line + "\n")
    if report.speedup is not None:
        out.write(
            f"latency: float {report.latency_ms['float']:.3f} ms, int8 {report.latency_ms['quantized']:.3f} ms "
            f"({report.speedup:.2f}x)\n"
        )
    out.write(f"wrote {args.out}" + (f" and {os.path.join(args.report, 'report.md')}" if args.report else "") + "\n")
    return EXIT_OK


def run_sensitivity(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import qcore
    from qcore.app.demo import pick_backend
    from qcore.app.report import sensitivity_markdown, write_sensitivity
    from qcore.app.user_objects import dynamic_batch, model_and_inputs
    from qcore.plugin_manager import get_plugin_manager

    if args.report:
        from qcore.app.files import check_writable_dir

        check_writable_dir(args.report, "--report")
    args.backend, _ = pick_backend(args.backend)
    get_plugin_manager().get_backend(args.backend)
    args.qat = False
    model, example_inputs, calibration = model_and_inputs(args)
    if calibration is not None and args.calibration_has_labels:
        calibration = [batch[:-1] for batch in calibration]
    with _quiet_torch_output(not args.debug):
        records = qcore.sensitivity(
            model, example_inputs, backend=args.backend, calibration=calibration,
            dynamic_shapes=dynamic_batch(example_inputs, args.dynamic_batch), progress=_progress(args),
        )
    out.write(f"partition sensitivity for {args.backend}:\n" + sensitivity_markdown(records) + "\n")
    if args.report:
        path = write_sensitivity(records, args.report, title=f"Partition sensitivity ({args.backend})")
        out.write(f"wrote {path}\n")
    return EXIT_OK


def run_explain(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = _quantize_from_args(args)
    out.write(result.report.explain() + "\n")
    return EXIT_OK


# --------------------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` returns its exit code."""

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class _ParserExit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    from qcore import __version__

    parser = _Parser(prog="qcore", description="qcore: quantization for PyTorch with plugin backends.")
    parser.add_argument("--version", action="version", version=f"qcore {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plugins = commands.add_parser("plugins", help="list the installed plugins, their hooks and backends")
    plugins.add_argument("--json", action="store_true", help="print a JSON list for tools instead of a table")
    plugins.set_defaults(run=run_plugins)

    demo = commands.add_parser(
        "demo", help="train a CNN on the digits data set, quantize and lower it, print accuracy and latency"
    )
    demo.add_argument("--report", default="qcore-report", metavar="DIR", help="report directory (default ./qcore-report)")
    demo.add_argument(
        "--backend", default="auto", metavar="NAME",
        help="a backend name (see `qcore plugins`), or auto (default): the available backend that prefers to run here",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument(
        "--quantizer",
        default=None, metavar="Q",
        help="instead: the step-by-step MLP walkthrough with Q: a backend name, toy (built in), or auto",
    )
    demo.add_argument(
        "--qat", action="store_true",
        help="also fine-tune with quantization-aware training (2 epochs, a few seconds) and print its accuracy next to PTQ",
    )
    demo.add_argument("--batches", type=_positive_int, default=8, help="walkthrough calibration batches (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=run_demo)

    for name, run, text in (
        ("quantize", run_quantize, "quantize a model: export, calibrate, convert, lower, save (and report)"),
        ("explain", run_explain, "quantize a model and say which ops become integer kernels and which stay float, and why"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("model", metavar="PKG.MODULE:FACTORY", help="a callable returning the model, or (model, example_inputs)")
        sub.add_argument(
            "--backend", default="auto", metavar="NAME",
            help="a backend name (see `qcore plugins`), or auto (default): the available backend that prefers to run here",
        )
        sub.add_argument(
            "--calibration", metavar="PKG.MODULE:LOADER",
            help="a callable returning an iterable of batches (a tensor or a tuple of inputs)",
        )
        sub.add_argument("--calibration-has-labels", action="store_true", help="each batch ends with a label to drop (with --qat: the label is the training target)")
        sub.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of every input dynamic")
        sub.add_argument(
            "--target-cpu", metavar="NAME",
            help="the hardware the program is for, when it is not this machine (the backend's names, e.g. for "
                 "x86 int8: amx, avx512_vnni, avx_vnni, avx2; `qcore plugins` shows this machine's); recorded in the program",
        )
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        qat = sub.add_argument_group(
            "quantization-aware training",
            "fine-tune a fake-quantized copy of the model on the --calibration batches, each (inputs..., target), then convert",
        )
        qat.add_argument("--qat", action="store_true", help="quantization-aware training instead of calibration only")
        qat.add_argument("--qat-epochs", type=_positive_int, metavar="N", help="passes over the batches (default 1)")
        qat.add_argument("--qat-lr", type=_positive_float, metavar="X", help="Adam's learning rate (default 1e-4)")
        qat.add_argument(
            "--qat-loss", choices=("cross_entropy", "mse"), help="loss of (output, target) (default cross_entropy)"
        )
        accuracy = sub.add_argument_group("accuracy", "beyond plain calibration (post-training only)")
        accuracy.add_argument(
            "--smooth-quant", type=_alpha, metavar="ALPHA",
            help="SmoothQuant: migrate activation outliers into the next linear's weights with strength ALPHA in (0, 1), e.g. 0.5",
        )
        accuracy.add_argument(
            "--bias-correction", action="store_true",
            help="move each quantized conv/linear's mean output error over the calibration batches into its bias",
        )
        accuracy.add_argument(
            "--min-sqnr", type=float, metavar="DB",
            help="keep the fewest partitions float (greedy by sensitivity) until the model's output SQNR vs float reaches DB",
        )
        if name == "quantize":
            sub.add_argument("--out", required=True, metavar="FILE", help="where to write the quantized program (.pt2)")
            sub.add_argument("--report", metavar="DIR", help="also write report.md and sqnr.png into DIR")
            dist = sub.add_argument_group("under torchrun", "torchrun --nproc-per-node N -m qcore quantize ...: rank 0 writes")
            dist.add_argument(
                "--no-shard", action="store_true",
                help="every rank calibrates on all the LOADER's batches (for a loader that shards by rank itself)",
            )
            dist.add_argument(
                "--dist-timeout", type=_positive_float, metavar="SECONDS",
                help="how long a rank waits for the others before failing (default QCORE_DIST_TIMEOUT or 300)",
            )
        sub.set_defaults(run=run)

    sens = commands.add_parser(
        "sensitivity", help="rank the quantized partitions by the output SQNR with only that partition kept float"
    )
    sens.add_argument("model", metavar="PKG.MODULE:FACTORY", help="a callable returning the model, or (model, example_inputs)")
    sens.add_argument("--backend", default="auto", metavar="NAME", help="a backend name (see `qcore plugins`), or auto (default)")
    sens.add_argument(
        "--calibration", metavar="PKG.MODULE:LOADER",
        help="a callable returning an iterable of batches (a tensor or a tuple of inputs): calibrates and measures",
    )
    sens.add_argument("--calibration-has-labels", action="store_true", help="each batch ends with a label to drop")
    sens.add_argument("--dynamic-batch", action="store_true", help="make dimension 0 of every input dynamic")
    sens.add_argument("--report", metavar="DIR", help="also write sensitivity.md and sensitivity.png into DIR")
    sens.add_argument("--quiet", action="store_true", help="no progress bars")
    sens.set_defaults(run=run_sensitivity)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    """A combination of arguments that cannot work (exit code 2), or None."""
    if getattr(args, "command", None) in ("quantize", "explain") and not args.qat:
        given = [flag for flag, value in (("--qat-epochs", args.qat_epochs), ("--qat-lr", args.qat_lr), ("--qat-loss", args.qat_loss)) if value is not None]
        if given:
            return f"{', '.join(given)} configure{'s' if len(given) == 1 else ''} quantization-aware training: add --qat"
    if getattr(args, "command", None) in ("quantize", "explain") and args.qat:
        given = [flag for flag, value in (("--smooth-quant", args.smooth_quant), ("--bias-correction", args.bias_correction or None),
                                          ("--min-sqnr", args.min_sqnr)) if value is not None]
        if given:
            return f"{', '.join(given)} apply to post-training quantization: not with --qat"
    return None


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``qcore`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParserExit as stop:
        return stop.status
    if args.command is None:
        parser.print_usage(sys.stderr)
        sys.stderr.write("qcore: error: missing command; choose one of: plugins, demo, quantize, explain, sensitivity (see `qcore --help`)\n")
        return EXIT_USAGE
    problem = _usage_problem(args)
    if problem:
        sys.stderr.write(f"qcore {args.command}: error: {problem}\n")
        return EXIT_USAGE
    try:
        return args.run(args, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        sys.stderr.write("qcore: interrupted\n")
        return 130
    except BrokenPipeError:  # `qcore plugins | head`: the reader left; say nothing more
        _silence_stdout()
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"qcore: error: {message} (run with --debug for the traceback)\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
