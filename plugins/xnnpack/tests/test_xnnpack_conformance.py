"""The core's backend conformance suite, run against the xnnpack plugin (its default config)."""

from __future__ import annotations

from qcore.testing.conformance import BackendConformance


class TestXNNPACKConformance(BackendConformance):
    backend = "xnnpack"
