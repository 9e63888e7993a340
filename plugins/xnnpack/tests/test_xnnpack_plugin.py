"""The plugin's hook implementations: backend record, annotators only for xnnpack, optional lowering."""

from __future__ import annotations

import importlib.util

import qcore
from qcore.plugin_manager import get_plugin_manager
from qcore_xnnpack import XNNPACKQuantizer, plugin
from qcore_xnnpack import lower_to_executorch as lowering


def test_backend_record_through_the_entry_point():
    record = get_plugin_manager().get_backend("xnnpack")
    assert record.quantizer_class is XNNPACKQuantizer
    assert record.distribution == "qcore-xnnpack" and record.is_available() is None


def test_annotators_are_only_for_xnnpack():
    assert plugin.annotate_op(backend="onednn") == []
    records = plugin.annotate_op(backend="xnnpack")
    assert records and all(isinstance(r, qcore.Annotator) for r in records)
    assert not any(a.plugin == "xnnpack" for a in get_plugin_manager().annotators("onednn"))


def test_lowering_pass_is_offered_only_when_executorch_is_installed(monkeypatch):
    assert plugin.lower_pattern(backend="onednn") == []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real_find_spec(name, *a))
    assert plugin.lower_pattern(backend="xnnpack") == []
    assert "pip install qcore-xnnpack[executorch]" in lowering.executorch_unavailable_reason()
