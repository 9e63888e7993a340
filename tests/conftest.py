"""Session setup for qcore's tests.

* The project's tests run strict: a plugin that fails to load is an error, not a warning
  (``QCORE_STRICT_PLUGINS=1`` unless the caller already set it).
* A test that changes the environment (it uses ``monkeypatch``: environment variables, sys.path,
  installed distributions) gets a fresh process-wide plugin manager before and after it, so no
  other test sees plugins loaded under its changes.
* ``child_venv`` makes a throwaway virtual environment that sees this test process's packages,
  for tests that install distributions without touching the test environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("QCORE_STRICT_PLUGINS", "1")

from qcore.plugin_manager import set_plugin_manager  # noqa: E402  (after the environment is set)


@pytest.fixture(autouse=True)
def _fresh_plugin_manager_around_environment_changes(request: pytest.FixtureRequest):
    changes_environment = "monkeypatch" in request.fixturenames
    if changes_environment:
        set_plugin_manager(None)
    yield
    if changes_environment:  # runs after monkeypatch has restored the environment
        set_plugin_manager(None)


@pytest.fixture
def fresh_plugin_manager():
    """Reset the process-wide plugin manager before and after the test."""
    set_plugin_manager(None)
    yield
    set_plugin_manager(None)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_child_venv(venv: Path) -> Path:
    """Create a venv at ``venv`` that also sees this process's installed packages; return its python.

    Like ``python -m venv --system-site-packages``, except that the packages seen are those of
    the environment running the tests (a tox venv included), appended after the venv's own
    site-packages: what is installed into the venv wins, and torch need not be installed again.
    The venv has no pip of its own; ``python -m pip`` runs the parent's pip against the venv.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv_python(venv)
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    parent_dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in parent_dirs)
    (Path(child_site) / "zz_parent_environment.pth").write_text(lines)
    return python


@pytest.fixture
def child_venv(tmp_path: Path) -> Callable[[str], Path]:
    """A factory: ``child_venv("name")`` makes a throwaway venv under tmp_path and returns its python."""
    return lambda name="venv": make_child_venv(tmp_path / name)
