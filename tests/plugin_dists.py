"""Build throwaway plugin distributions on disk (a module plus a dist-info with entry points),
so tests exercise the real entry-point path without installing anything."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

TEST_GROUP = "qcore_test_plugins"


def make_plugin_dist(
    site: Path,
    dist: str,
    entry_name: str,
    module: str,
    source: str,
    group: str = TEST_GROUP,
    version: str = "1.2.3",
) -> None:
    """Write ``module.py`` with ``source`` and a dist-info declaring it under ``group``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    entry_points = info / "entry_points.txt"
    existing = entry_points.read_text() if entry_points.exists() else ""
    if f"[{group}]" not in existing:
        existing += f"[{group}]\n"
    entry_points.write_text(existing + f"{entry_name} = {module}\n")
    importlib.invalidate_caches()
    sys.modules.pop(module, None)
