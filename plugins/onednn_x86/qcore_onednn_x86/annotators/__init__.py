"""The x86 annotators, one module per op family, as ``qcore.Annotator`` records."""

from __future__ import annotations


def x86_annotators() -> list:
    """Every annotator of the x86 recipe (qcore orders them: fused patterns first)."""
    return []
