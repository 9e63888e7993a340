"""The three distributions as users get them: wheels built, installed into a fresh venv, discovered.

The wheels are built from a copy of each source tree (so no ``build/`` directory is left in, or
read from, the work tree), installed into a throwaway venv that sees this environment's torch
but not its qcore, and the venv's ``qcore plugins --json`` must list each backend with the
distribution and version of its wheel.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {  # distribution -> (source dir, import package, entry-point name)
    "qcore": (REPO, "qcore", None),
    "qcore-xnnpack": (REPO / "plugins" / "xnnpack", "qcore_xnnpack", "xnnpack"),
    "qcore-onednn-x86": (REPO / "plugins" / "onednn_x86", "qcore_onednn_x86", "onednn"),
}
SKIP_IN_COPY = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".tox", ".git", ".pytest_cache")


def _project_version(source: Path) -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((source / "pyproject.toml").read_text())["project"]["version"]


def _copy_source(source: Path, dest: Path) -> Path:
    if source == REPO:  # the core: only what its wheel is built from
        dest.mkdir(parents=True)
        for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
            if (source / name).exists():
                shutil.copy2(source / name, dest / name)
        shutil.copytree(source / "qcore", dest / "qcore", ignore=SKIP_IN_COPY)
    else:
        shutil.copytree(source, dest, ignore=SKIP_IN_COPY)
    return dest


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Build one wheel per distribution (no build isolation: setuptools comes from the test extra)."""
    work = tmp_path_factory.mktemp("packaging")
    sources = [_copy_source(src, work / "src" / dist) for dist, (src, _, _) in DISTRIBUTIONS.items()]
    out = work / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(out), *map(str, sources)],
        capture_output=True, text=True, timeout=900, cwd=work,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    found = {}
    for wheel in out.glob("*.whl"):
        found[_wheel_metadata(wheel)["Name"]] = wheel
    assert set(found) == set(DISTRIBUTIONS), sorted(found)
    return found


def test_wheels_carry_versions_extras_entry_points_and_console_script(wheels):
    for dist, (source, package, entry_name) in DISTRIBUTIONS.items():
        wheel = wheels[dist]
        metadata = _wheel_metadata(wheel)
        assert metadata["Version"] == _project_version(source)
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            assert f"{package}/__init__.py" in names
            assert not [n for n in names if "/tests/" in n or n.startswith("tests/")], "tests must not ship"
            entry_points = next((zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
        if entry_name is not None:
            assert "[qcore]" in entry_points
            assert f"{entry_name} = {package}.plugin" in entry_points
            assert f"{package}/plugin.py" in names
        else:
            assert "[console_scripts]" in entry_points and "qcore = qcore.app.cli:main" in entry_points
    with zipfile.ZipFile(wheels["qcore"]) as zf:
        kernels = [n for n in zf.namelist() if n.startswith("qcore/observers/_search_kernel") and n.endswith(".so")]
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is not None:  # built where a C compiler is (optional elsewhere)
        assert kernels, "the core wheel carries the compiled histogram search"
    core = _wheel_metadata(wheels["qcore"])
    requires = core.get_all("Requires-Dist")
    assert set(core.get_all("Provides-Extra")) >= {"xnnpack", "onednn"}
    for dist, extra in (("qcore-xnnpack", "xnnpack"), ("qcore-onednn-x86", "onednn")):
        version = _project_version(DISTRIBUTIONS[dist][0])
        assert f'{dist}=={version}; extra == "{extra}"' in requires, requires


def test_fresh_venv_from_wheels_lists_both_backends(wheels, child_venv, tmp_path):
    python = child_venv("from-wheels")
    # --ignore-installed: install into the venv even though this environment has (editable) copies;
    # --no-deps: torch, pluggy, attrs and numpy come from this environment, seen by the venv.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed",
         *map(str, wheels.values())],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    venv = python.parent.parent

    where = subprocess.run(
        [str(python), "-c", "import json, qcore, qcore_xnnpack, qcore_onednn_x86 as o; "
         "print(json.dumps([qcore.__file__, qcore_xnnpack.__file__, o.__file__]))"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for module_file in json.loads(where.stdout):
        path = Path(module_file).resolve()
        assert venv.resolve() in path.parents and "site-packages" in path.parts, path
        assert REPO not in path.parents, f"imported from the source tree: {path}"

    qcore_script = venv / ("Scripts/qcore.exe" if os.name == "nt" else "bin/qcore")
    assert qcore_script.exists(), "the wheel installs the `qcore` console script"
    listing = subprocess.run(
        [str(qcore_script), "plugins", "--json"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=dict(os.environ, QCORE_STRICT_PLUGINS="1"),
    )
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["qcore"]["version"] == _project_version(REPO)
    for dist, (source, _, entry_name) in DISTRIBUTIONS.items():
        if entry_name is None:
            continue
        row = rows[entry_name]
        assert row["status"] == "loaded", row
        assert row["distribution"] == dist
        assert row["version"] == _project_version(source)
        assert "qcore_register_backends" in row["hooks"]
    assert rows["xnnpack"]["backends"] == ["xnnpack"]
    assert rows["onednn"]["backends"] == ["onednn"]


# --------------------------------------------------------------------------- README and CI agree
def _code_blocks(markdown: str, language: str) -> list[str]:
    import re

    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)


def _commands(block: str) -> list[str]:
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_opens_with_the_demo_and_the_test_command_that_ci_runs():
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)
    assert first_block[0].strip() == "# qcore", "the README must open with the two commands"
    demo, tests = _commands(_code_blocks(readme, "bash")[0])
    assert demo.endswith("&& qcore demo") and "torch==2.13.0" in demo
    assert "python -m pytest" in tests and "torch==2.13.0" in tests and "QCORE_STRICT_PLUGINS=1" in tests
    ci_commands = [c for c in _commands((REPO / ".ci" / "run").read_text()) if not c.startswith(("set ", "cd "))]
    assert ci_commands[0] == tests, ".ci/run must run exactly the README's test command first"
    assert ci_commands[1:] == [
        'python -m pip install "tox>=4,<5" "ruff>=0.6,<1" "mypy>=1.10"', "ruff check .", "mypy",
        'python -m tox -e core -- -m "not slow"',
    ], "after it, .ci/run only lints, type-checks and runs the core alone"


def test_readme_quickstart_runs(capsys, fresh_plugin_manager):
    pytest.importorskip("qcore_xnnpack")
    (quickstart,) = _code_blocks((REPO / "README.md").read_text(), "python")[:1]
    exec(compile(quickstart, "README.md quickstart", "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([4, 8])"


def test_core_wheel_builds_without_a_c_compiler(tmp_path):
    """The compiled histogram search is optional: with no working C compiler the core still
    builds (the numpy search runs instead)."""
    source = _copy_source(REPO, tmp_path / "src" / "qcore")
    out = tmp_path / "wheels"
    env = {**os.environ, "CC": "false", "LDSHARED": "false"}  # a compiler that always fails
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("qcore-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "qcore/observers/histogram_search.py" in names
    assert not [n for n in names if "_search_kernel" in n and n.endswith(".so")]


def test_warnings_are_errors_and_upstream_ones_are_filtered_by_message(pytestconfig):
    filters = pytestconfig.getini("filterwarnings")
    assert filters[0] == "error", "the test config turns every warning into an error"
    for entry in filters[1:]:
        action, message, category = entry.split(":")[:3]
        assert action == "ignore" and message and category.endswith("Warning"), f"filter {entry!r} names no message"
    with pytest.raises(UserWarning, match="a leaked warning"):
        warnings.warn("a leaked warning", UserWarning)
