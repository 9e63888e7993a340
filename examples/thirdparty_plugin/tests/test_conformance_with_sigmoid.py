"""The core's conformance suite, run against both backends with this plugin installed:
adding the sigmoid annotator must not break what either backend guarantees."""

from __future__ import annotations

import pytest

pytest.importorskip("qcore_example_sigmoid")

from qcore.testing.conformance import BackendConformance  # noqa: E402


class TestXnnpackWithSigmoidPlugin(BackendConformance):
    backend = "xnnpack"

    def make_quantizer(self):
        xnnpack = pytest.importorskip("qcore_xnnpack")
        return xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config(is_per_channel=True))

    def test_lowering_agrees_with_the_converted_model(self) -> None:
        pytest.skip("ExecuTorch lowering is covered by the xnnpack plugin's own tests")


class TestOnednnWithSigmoidPlugin(BackendConformance):
    backend = "onednn"

    def make_quantizer(self):
        onednn = pytest.importorskip("qcore_onednn_x86")
        return onednn.X86InductorQuantizer().set_global(onednn.get_default_x86_inductor_quantization_config())
