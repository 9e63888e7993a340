"""The oneDNN lowering passes, one per file, as ``qcore.LoweringPass`` records."""

from __future__ import annotations


def onednn_lowering_passes() -> list:
    """Every lowering pass of the backend (qcore orders them by ``after``)."""
    return []
