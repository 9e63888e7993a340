"""The ``qcore`` command: the plugins table and JSON, the demo, exit codes and error messages."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import re
import subprocess
import sys

import pytest

from qcore.app.cli import main
from qcore.app.plugin_table import format_plugin_table
from qcore.errors import PluginError

from plugin_dists import make_plugin_dist

JSON_KEYS = {"name", "distribution", "version", "status", "hooks", "backends", "error", "hardware"}


def installed_plugin_entry_points() -> dict:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group="qcore")}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def broken_site(tmp_path, monkeypatch):
    """A distribution on sys.path whose ``qcore`` entry point raises on import; strict mode off."""
    site = tmp_path / "site"
    make_plugin_dist(
        site, "qcore-cli-broken", "cli_broken", "qcore_cli_broken_plugin",
        "raise ImportError('needs a library that is not installed')\n", group="qcore", version="9.9.9",
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("QCORE_STRICT_PLUGINS", raising=False)
    return site


# --------------------------------------------------------------------------- qcore plugins
def test_plugins_json_lists_every_plugin_with_its_fields(capsys, fresh_plugin_manager):
    code, out, err = run_cli(capsys, "plugins", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list) and rows
    assert all(set(row) == JSON_KEYS for row in rows)
    by_name = {row["name"]: row for row in rows}
    core = by_name["qcore"]
    assert core["status"] == "loaded" and core["distribution"] == "qcore" and core["error"] == ""
    assert "insert_observers" in core["hooks"]
    for name, ep in installed_plugin_entry_points().items():
        row = by_name[name]
        assert row["distribution"] == ep.dist.name
        assert row["version"] == ep.dist.version
        assert row["hooks"] == sorted(row["hooks"])


def test_plugins_json_lists_each_installed_backend_with_its_distribution(capsys, fresh_plugin_manager):
    import qcore

    code, out, _ = run_cli(capsys, "plugins", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    registered = qcore.get_plugin_manager().backends(include_unavailable=True)
    for backend in registered.values():
        row = rows[backend.plugin]
        assert backend.name in row["backends"]
        assert row["distribution"] == backend.distribution
        assert "qcore_register_backends" in row["hooks"]
    if "xnnpack" in installed_plugin_entry_points():
        assert rows["xnnpack"]["backends"] == ["xnnpack"]
        assert rows["xnnpack"]["distribution"] == "qcore-xnnpack"
    if "onednn" in installed_plugin_entry_points():
        assert rows["onednn"]["distribution"] == "qcore-onednn-x86"
        from qcore_onednn_x86.cpu_features import detect_cpu

        cpu = rows["onednn"]["hardware"]["onednn"]  # what the backend reads of this CPU
        assert cpu["target"] == cpu["int8_kernel"] == detect_cpu().int8_kernel
        assert cpu["native_bf16"] == detect_cpu().native_bf16 and cpu["describe"] == detect_cpu().describe()


def test_plugins_table_ends_with_what_each_backend_reads_of_this_machine(capsys, fresh_plugin_manager):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    if "onednn" in installed_plugin_entry_points():
        from qcore_onednn_x86.cpu_features import detect_cpu

        assert f"onednn on this machine: {detect_cpu().describe()}" in out.splitlines()


def test_plugins_table_has_a_header_and_one_row_per_plugin(capsys, fresh_plugin_manager):
    code, out, err = run_cli(capsys, "plugins")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["plugin", "distribution", "version", "status", "hooks", "backends"]
    assert set(lines[1]) == {"-", " "}
    table = itertools.takewhile(str.strip, lines[2:])  # then a blank line, what the backends read of this machine
    first_cells = [line.split()[0] for line in table]
    _, json_out, _ = run_cli(capsys, "plugins", "--json")
    assert first_cells == [row["name"] for row in json.loads(json_out)]
    core_row = next(line for line in lines if line.startswith("qcore "))
    assert "loaded" in core_row and "insert_observers" in core_row


def test_table_formatting_shows_failures_below_the_table():
    rows = [
        {"name": "good", "distribution": "d-good", "version": "1.0", "status": "loaded",
         "hooks": ["annotate_op", "qcore_register_backends"], "backends": ["b1", "b2"], "error": ""},
        {"name": "bad", "distribution": "d-bad", "version": "2.0", "status": "failed",
         "hooks": [], "backends": [], "error": "ImportError: no module named x"},
    ]
    text = format_plugin_table(rows)
    lines = text.splitlines()
    assert lines[2].split(None, 4)[:4] == ["good", "d-good", "1.0", "loaded"]
    assert "annotate_op, qcore_register_backends" in lines[2] and lines[2].endswith("b1, b2")
    assert lines[3].split() == ["bad", "d-bad", "2.0", "failed", "-", "-"]
    assert lines[-1] == "failed: bad (d-bad 2.0): ImportError: no module named x"
    # columns line up
    assert lines[0].index("distribution") == lines[2].index("d-good") == lines[3].index("d-bad")


def test_failed_plugin_is_listed_with_its_error_and_warned_about(capsys, broken_site):
    code, out, err = run_cli(capsys, "plugins")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("cli_broken "))
    assert row.split()[:4] == ["cli_broken", "qcore-cli-broken", "9.9.9", "failed"]
    assert "failed: cli_broken (qcore-cli-broken 9.9.9): ImportError: needs a library that is not installed" in out
    assert re.search(r"qcore: warning: qcore plugin 'cli_broken' from distribution 'qcore-cli-broken' failed", err)

    code, out, err = run_cli(capsys, "plugins", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}  # stdout is pure JSON, warnings stay off it
    assert rows["cli_broken"]["status"] == "failed"
    assert rows["cli_broken"]["error"] == "ImportError: needs a library that is not installed"
    assert rows["qcore"]["status"] == "loaded"  # the others still load


def test_strict_mode_turns_a_failed_plugin_into_a_one_line_error(capsys, broken_site, monkeypatch):
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    code, out, err = run_cli(capsys, "plugins", "--json")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("qcore: error: ")
    assert "'cli_broken' from distribution 'qcore-cli-broken'" in err and "QCORE_STRICT_PLUGINS" in err
    assert "Traceback" not in err


def test_debug_shows_the_real_exception(broken_site, monkeypatch):
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="cli_broken"):
        main(["--debug", "plugins"])


# --------------------------------------------------------------------------- usage errors
def test_an_unknown_walkthrough_quantizer_names_the_installed_backends(capsys):
    code, out, err = run_cli(capsys, "demo", "--quantizer", "tensorrt")
    assert code == 1 and "unknown backend 'tensorrt'; installed backends: " in err and "reference" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "missing command"),
        (["plugins", "--yaml"], "unrecognized arguments: --yaml"),
        (["demo", "--batches", "0"], "expected a positive integer, got 0"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "usage: qcore" in err
    assert "Traceback" not in err


def test_help_and_version_exit_0(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "plugins" in out and "demo" in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and re.fullmatch(r"qcore \d+\.\d+\.\d+\S*\n", out)


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("qcore") == "qcore.app.cli:main"


def test_command_in_a_real_process_exit_codes_and_clean_stderr(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "qcore.app.cli", "plugins", "--json"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert any(row["name"] == "qcore" for row in json.loads(ok.stdout))
    bad = subprocess.run([sys.executable, "-m", "qcore.app.cli", "nope"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_importing_the_cli_loads_no_plugin_and_nothing_heavy():
    code = (
        "import sys, qcore.app.cli\n"
        "heavy = [m for m in sys.modules if m.startswith(('torch._inductor', 'qcore_', 'torchao', 'executorch', 'qcore.testing', 'qcore.observers'))]\n"
        "assert not heavy, heavy\n"
        "from qcore.plugin_manager import get_plugin_manager\n"
        "assert get_plugin_manager()._pm is None\n"
        "print('cheap')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cheap"


# --------------------------------------------------------------------------- qcore demo
def _sqnr(out: str) -> float:
    match = re.search(r"SQNR vs float = (-?[\d.]+|inf) dB", out)
    assert match, out
    return float(match.group(1))


def test_demo_with_the_builtin_toy_quantizer(capsys, fresh_plugin_manager):
    code, out, err = run_cli(capsys, "demo", "--quantizer", "toy", "--batches", "2")
    assert code == 0, err
    assert "ToyLinearQuantizer" in out
    counts = dict(re.findall(r"(\w+) x(\d+)", out.split("convert_pt2e:")[1].splitlines()[0]))
    assert int(counts["quantize_per_tensor"]) >= 3 and int(counts["dequantize_per_tensor"]) >= 3
    assert int(counts["dequantize_per_channel"]) == 3  # the three folded weights
    assert _sqnr(out) > 20.0


def test_walkthrough_auto_takes_the_backend_that_prefers_to_run_here(capsys, fresh_plugin_manager):
    from qcore.app.demo import pick_backend
    from qcore.plugin_manager import get_plugin_manager

    chosen, _ = pick_backend("auto")
    preferences = {b.name: b.preference for b in get_plugin_manager().backends().values()}
    assert preferences[chosen] == max(preferences.values())
    code, out, err = run_cli(capsys, "demo", "--quantizer", "auto")
    assert code == 0, err
    assert f"{get_plugin_manager().get_backend(chosen).quantizer_class.__name__} (" in out and f"backend {chosen}" in out
    assert re.search(r"quantize_per_tensor x\d+", out)
    assert _sqnr(out) > 20.0


def test_walkthrough_without_backend_plugins_uses_the_reference_backend(capsys, fresh_plugin_manager, monkeypatch):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "xnnpack,onednn")  # as if no backend plugin were installed
    code, out, err = run_cli(capsys, "demo", "--quantizer", "auto", "--batches", "1")
    assert code == 0, err
    assert "ReferenceQuantizer (qcore, backend reference)" in out


def test_walkthrough_asking_for_a_missing_backend_is_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "xnnpack")
    code, out, err = run_cli(capsys, "demo", "--quantizer", "xnnpack")
    assert code == 1
    assert err.startswith("qcore: error: unknown backend 'xnnpack'; installed backends: ") and err.count("\n") == 1
    assert "reference" in err
