"""The core's conformance suite, run against both backends with this plugin installed:
adding the sigmoid annotator must not break what either backend guarantees."""

from __future__ import annotations

import pytest

pytest.importorskip("qcore_example_sigmoid")

from qcore.testing import requires_backend  # noqa: E402
from qcore.testing.conformance import BackendConformance  # noqa: E402


@requires_backend("xnnpack")
class TestXnnpackWithSigmoidPlugin(BackendConformance):
    backend = "xnnpack"

    def test_lowering_agrees_with_the_converted_model(self) -> None:
        pytest.skip("ExecuTorch lowering is covered by the xnnpack plugin's own tests")

    def test_lowering_twice_changes_nothing(self) -> None:
        pytest.skip("ExecuTorch lowering is covered by the xnnpack plugin's own tests")


@requires_backend("onednn")
class TestOnednnWithSigmoidPlugin(BackendConformance):
    backend = "onednn"


@requires_backend("reference")
class TestReferenceWithSigmoidPlugin(BackendConformance):
    backend = "reference"
