"""Checks before the commands write, and the atomic report write.

>>> import tempfile
>>> check_writable_dir(tempfile.mkdtemp(), "--report")
"""

from __future__ import annotations

from typing import Any

from qcore.errors import CliError


def check_writable_file(path: str, what: str) -> None:
    import os

    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CliError(f"{what} {path} is a directory; give a file name such as model.pt2")
    if not os.path.isdir(directory):
        raise CliError(f"{what} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CliError(f"{what} {path}: directory {directory} is not writable")


def check_writable_dir(path: str, what: str) -> None:
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
