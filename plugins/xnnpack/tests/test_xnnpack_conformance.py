"""The core's backend conformance suite, run against the xnnpack plugin."""

from __future__ import annotations

from qcore.testing.conformance import BackendConformance
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config


class TestXNNPACKConformance(BackendConformance):
    backend = "xnnpack"

    def make_quantizer(self) -> XNNPACKQuantizer:
        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config())

