"""The ``qcore`` command: list plugins, run a small demo.

    qcore plugins            a table for people: plugin, distribution, version, status, hooks, backends
    qcore plugins --json     the same for tools: a JSON list of objects
    qcore demo               train a small CNN on the digits data set, quantize it (onednn, or
                             xnnpack), print float vs int8 accuracy and latency, write a report
    qcore demo --quantizer Q the step-by-step MLP walkthrough with quantizer Q (auto, xnnpack, toy)
    qcore demo --qat         the digits demo, plus quantization-aware training next to PTQ
    qcore quantize PKG.MODULE:FACTORY --calibration PKG.MODULE:LOADER --out model.pt2 [--report DIR]
    qcore quantize ... --qat [--qat-epochs N] [--qat-lr X] [--qat-loss L]
                             quantization-aware training on the LOADER's (inputs..., target) batches
    qcore explain PKG.MODULE:FACTORY [--calibration ...]   which ops become integer kernels, and why
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
import warnings
from typing import Any, Iterator, Optional, Sequence, TextIO

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

PLUGIN_COLUMNS = ("plugin", "distribution", "version", "status", "hooks", "backends")


# --------------------------------------------------------------------------- qcore plugins
def plugin_rows() -> tuple[list[dict], list[str]]:
    """(one dict per plugin, the load warnings as one-line messages), from the process-wide manager.

    Under ``QCORE_STRICT_PLUGINS=1`` a plugin that fails to load raises ``qcore.errors.PluginError``.
    """
    from qcore.plugin_manager import PluginLoadWarning, get_plugin_manager

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginLoadWarning)
        infos = get_plugin_manager().plugin_infos()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    for w in caught:  # anything else goes back to the normal warning machinery
        if not issubclass(w.category, PluginLoadWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return [info.to_dict() for info in infos], messages


def format_plugin_table(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (as from :func:`plugin_rows`), then one line per failure."""
    cells = [list(PLUGIN_COLUMNS)]
    for row in rows:
        cells.append(
            [
                row["name"],
                row["distribution"],
                row["version"],
                row["status"],
                ", ".join(row["hooks"]) or "-",
                ", ".join(row["backends"]) or "-",
            ]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(PLUGIN_COLUMNS))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    machine = [
        f"{backend} on this machine: {facts.get('describe') or facts}"
        for row in rows
        for backend, facts in sorted(row.get("hardware", {}).items())
    ]
    if machine:
        lines += [""] + machine
    problems = [row for row in rows if row["status"] != "loaded"]
    if problems:
        lines.append("")
        for row in problems:
            lines.append(f"{row['status']}: {row['name']} ({row['distribution']} {row['version']}): {row['error']}")
    return "\n".join(lines)


def run_plugins(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
def _demo_quantizer(choice: str) -> tuple[Any, str]:
    """(quantizer, a sentence naming it) for ``--quantizer``: xnnpack, toy, or auto (xnnpack if installed)."""
    if choice in ("auto", "xnnpack"):
        try:
            from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config
        except ImportError as exc:
            if choice == "xnnpack":
                raise RuntimeError(
                    f"the xnnpack backend is not installed ({exc}); install it with "
                    f"`pip install qcore[xnnpack]` or run `qcore demo --quantizer toy`"
                ) from exc
        else:
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
            return quantizer, "XNNPACKQuantizer (qcore-xnnpack), symmetric int8 config"
    from qcore.testing.toy import ToyLinearQuantizer

    note = "" if choice == "toy" else " (qcore-xnnpack is not installed)"
    return ToyLinearQuantizer(), f"ToyLinearQuantizer (built into qcore){note}"


def _count_qdq(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name.startswith("quantized_decomposed."):
            op = name.split(".")[1]
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def run_mlp_walkthrough(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import torch

    import qcore
    from qcore.testing.conformance import sqnr_db

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).eval()
    example_inputs = (torch.randn(4, 16),)
    quantizer, quantizer_name = _demo_quantizer(args.quantizer)

    out.write("model: MLP Linear(16,32) ReLU Linear(32,32) ReLU Linear(32,8)\n")
    out.write(f"quantizer: {quantizer_name}\n")
    exported = torch.export.export(model, example_inputs).module()
    out.write("1. exported with torch.export\n")
    prepared = qcore.prepare_pt2e(exported, quantizer)
    observers = sum(1 for node in prepared.graph.nodes if node.op == "call_module")
    out.write(f"2. prepare_pt2e: {observers} observers inserted\n")
    with torch.no_grad():
        for _ in range(args.batches):
            prepared(torch.randn(4, 16))
    out.write(f"3. calibrated on {args.batches} random batches\n")
    converted = qcore.convert_pt2e(prepared)
    counts = _count_qdq(converted)
    summary = ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none"
    out.write(f"4. convert_pt2e: {summary}\n")
    test_batches = [torch.randn(4, 16) for _ in range(16)]  # the exported graph has batch size 4
    with torch.no_grad():
        reference = torch.cat([model(x) for x in test_batches])
        quantized = torch.cat([converted(x) for x in test_batches])
    out.write(f"5. ran on {len(test_batches) * 4} new samples: SQNR vs float = {sqnr_db(reference, quantized):.1f} dB\n")
    return EXIT_OK


def run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Without ``--quantizer``: the digits demo (``qcore.demo``); with it: the MLP walkthrough."""
    if args.quantizer is not None:
        return run_mlp_walkthrough(args, out, err)
    from qcore.demo import run_digits_demo

    run_digits_demo(
        report_dir=args.report, backend=args.backend, seed=args.seed, out=out, progress=_progress(args), qat=args.qat
    )
    return EXIT_OK


# --------------------------------------------------------------------------- qcore quantize / explain
class CliError(Exception):
    """A user error the command reports in one line (exit code 1)."""


def _progress(args: argparse.Namespace) -> Any:
    """A tqdm wrapper for ``qcore.quantize(progress=...)`` when stdout is a terminal, else None."""
    if getattr(args, "quiet", False) or not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    stream = sys.stderr

    def progress(iterable: Any, desc: str) -> Any:
        unit = "batch" if desc == "calibrate" or desc.startswith("QAT epoch") else "step"
        return tqdm(iterable, desc=desc, unit=unit, file=stream, leave=False)

    return progress


def load_object(spec: str, what: str) -> Any:
    """The object ``spec`` names: ``pkg.module:name`` or ``path/to/file.py:name``."""
    import importlib
    import importlib.util
    import os

    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"{what} must look like PKG.MODULE:NAME or path/to/file.py:NAME, got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise CliError(f"{what}: file {module_name} does not exist")
        unique = "qcore_cli_user_" + os.path.splitext(os.path.basename(module_name))[0]
        loader_spec = importlib.util.spec_from_file_location(unique, module_name)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[unique] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise CliError(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current directory
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise CliError(f"{what}: cannot import module {module_name!r} ({exc})") from exc
        except Exception as exc:
            raise CliError(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise CliError(f"{what}: module {module_name} has no attribute {attribute!r}") from None


def _call(spec: str, what: str) -> Any:
    factory = load_object(spec, what)
    if not callable(factory):
        raise CliError(f"{what}: {spec} is a {type(factory).__name__}, not a callable")
    try:
        return factory()
    except Exception as exc:
        raise CliError(f"{what}: {spec}() raised {type(exc).__name__}: {exc}") from exc


class _ReloadingBatches:
    """Batches for several QAT epochs from a loader that returned a one-shot iterator (a generator):
    the first epoch reads ``first``, each later one calls the loader again."""

    def __init__(self, first: Any, loader: Any) -> None:
        self._first = first
        self._loader = loader

    def __iter__(self) -> Iterator[Any]:
        first, self._first = self._first, None
        return iter(first) if first is not None else iter(self._loader())


def _model_and_inputs(args: argparse.Namespace) -> tuple:
    """(model, example_inputs, calibration batches or None) from the command's specs.

    With ``--qat`` each batch is the model's inputs followed by the target, kept for training.
    """
    import itertools

    import torch

    made = _call(args.model, "model factory")
    example_inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example_inputs = made
    if not isinstance(made, torch.nn.Module):
        raise CliError(f"model factory: {args.model}() returned {type(made).__name__}; expected a torch.nn.Module or (module, example_inputs)")
    calibration = None
    if args.calibration:
        batches = _call(args.calibration, "calibration loader")
        try:
            iterator = iter(batches)
        except TypeError:
            raise CliError(f"calibration loader: {args.calibration}() returned {type(batches).__name__}, not an iterable of batches") from None
        first = next(iterator, None)
        if first is None:
            raise CliError(f"calibration loader: {args.calibration}() gave no batches")
        if args.qat and (not isinstance(first, (tuple, list)) or len(first) < 2):
            raise CliError(
                f"--qat trains on the calibration batches, so each must be (inputs..., target); "
                f"{args.calibration}() gave a {type(first).__name__}"
                + (f" of {len(first)} item(s)" if isinstance(first, (tuple, list)) else "")
            )
        if iterator is not batches:  # a list or a DataLoader: it can be read again, from the start
            calibration = batches
        elif args.qat:
            calibration = _ReloadingBatches(itertools.chain([first], iterator), lambda: _call(args.calibration, "calibration loader"))
        else:
            calibration = itertools.chain([first], iterator)
        if example_inputs is None:
            example_inputs = (first,) if isinstance(first, torch.Tensor) else tuple(first)
            if args.calibration_has_labels or args.qat:
                example_inputs = example_inputs[:-1]
    if example_inputs is None:
        raise CliError(
            f"no example inputs: give --calibration PKG.MODULE:LOADER, or make {args.model}() return (module, example_inputs)"
        )
    return made, example_inputs, calibration


def _dynamic_batch(example_inputs: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return tuple({0: batch} for _ in inputs)


def _check_writable_file(path: str, what: str) -> None:
    import os

    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CliError(f"{what} {path} is a directory; give a file name such as model.pt2")
    if not os.path.isdir(directory):
        raise CliError(f"{what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CliError(f"{what} {path}: directory {directory} is not writable")


def _check_writable_dir(path: str, what: str) -> None:
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{what} {path} exists and is not a directory")
    parent = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"{what} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{what} {path}: directory {parent} is not writable")


def write_report_atomically(report: Any, directory: str) -> None:
    """Write ``report`` into ``directory`` via a temporary sibling directory, so a failure leaves nothing."""
    import os
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(directory))
    temporary = tempfile.mkdtemp(dir=parent, prefix=".qcore-report.")
    try:
        report.write(temporary)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(temporary):
            os.replace(os.path.join(temporary, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _quantize_from_args(args: argparse.Namespace) -> Any:
    import qcore
    from qcore.plugin_manager import get_plugin_manager

    get_plugin_manager().get_backend(args.backend)  # an unknown backend fails before any work
    if args.qat and not args.calibration:
        raise CliError("--qat trains on the calibration batches: give --calibration PKG.MODULE:LOADER yielding (inputs..., target)")
    model, example_inputs, calibration = _model_and_inputs(args)
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
            dynamic_shapes=_dynamic_batch(example_inputs, args.dynamic_batch), progress=progress,
            target=args.target_cpu, **qat_options,
        )


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
    import os

    _check_writable_file(args.out, "--out")
    if args.report:
        _check_writable_dir(args.report, "--report")
    result = _quantize_from_args(args)
    result.save(args.out)
    if args.report:
        try:
            write_report_atomically(result.report, args.report)
        except BaseException:
            os.remove(args.out)
            raise
    report = result.report
    quantized = sum(1 for node in report.nodes if node.quantized)
    if report.training is not None:
        out.write(f"quantization-aware training: {report.training.describe()}\n")
    made_for = f"{args.backend} (target {args.target_cpu})" if args.target_cpu else args.backend
    out.write(f"quantized for {made_for}: {quantized} of {len(report.nodes)} compute nodes run on int8 inputs\n")
    if report.model_sqnr_db is not None:
        measured = f" (lowered, what runs; q/dq program {report.qdq_sqnr_db:.1f} dB)" if report.lowered_sqnr_db is not None else ""
        out.write(f"model output SQNR vs float: {report.model_sqnr_db:.1f} dB{measured}\n")
    if report.speedup is not None:
        out.write(
            f"latency: float {report.latency_ms['float']:.3f} ms, int8 {report.latency_ms['quantized']:.3f} ms "
            f"({report.speedup:.2f}x)\n"
        )
    out.write(f"wrote {args.out}" + (f" and {os.path.join(args.report, 'report.md')}" if args.report else "") + "\n")
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
        "--backend", choices=("auto", "onednn", "xnnpack"), default="auto",
        help="auto (default): onednn if it is available here, else xnnpack",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument(
        "--quantizer",
        choices=("auto", "xnnpack", "toy"),
        default=None,
        help="instead: the step-by-step MLP walkthrough with xnnpack, toy (built in), or auto",
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
        sub.add_argument("--backend", default="onednn", help="backend name (default onednn; see `qcore plugins`)")
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
        if name == "quantize":
            sub.add_argument("--out", required=True, metavar="FILE", help="where to write the quantized program (.pt2)")
            sub.add_argument("--report", metavar="DIR", help="also write report.md and sqnr.png into DIR")
        sub.set_defaults(run=run)
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


def _usage_problem(args: argparse.Namespace) -> Optional[str]:
    """A combination of arguments that cannot work (exit code 2), or None."""
    if getattr(args, "command", None) in ("quantize", "explain") and not args.qat:
        given = [flag for flag, value in (("--qat-epochs", args.qat_epochs), ("--qat-lr", args.qat_lr), ("--qat-loss", args.qat_loss)) if value is not None]
        if given:
            return f"{', '.join(given)} configure{'s' if len(given) == 1 else ''} quantization-aware training: add --qat"
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
        sys.stderr.write("qcore: error: missing command; choose one of: plugins, demo, quantize, explain (see `qcore --help`)\n")
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
