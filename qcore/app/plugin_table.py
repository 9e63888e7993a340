"""What ``qcore plugins`` prints: one row per plugin, and the hardware each backend reads.

>>> rows, warnings_seen = plugin_rows()
>>> "qcore" in [row["name"] for row in rows]
True
"""

from __future__ import annotations

import warnings

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
