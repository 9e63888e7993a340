"""The ``qcore`` command: list plugins, run a small demo.

    qcore plugins            a table for people: plugin, distribution, version, status, hooks, backends
    qcore plugins --json     the same for tools: a JSON list of objects
    qcore demo               quantize a small MLP end to end and say what happened
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
import json
import sys
import warnings
from typing import Any, Optional, Sequence, TextIO

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


def run_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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

    demo = commands.add_parser("demo", help="quantize a small MLP end to end and print what happened")
    demo.add_argument(
        "--quantizer",
        choices=("auto", "xnnpack", "toy"),
        default="auto",
        help="xnnpack (needs qcore-xnnpack), toy (built in), or auto: xnnpack if installed (default)",
    )
    demo.add_argument("--batches", type=_positive_int, default=8, help="calibration batches (default 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(run=run_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
        sys.stderr.write("qcore: error: missing command; choose one of: plugins, demo (see `qcore --help`)\n")
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
