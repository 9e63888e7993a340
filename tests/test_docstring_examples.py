"""Every example in qcore's docstrings runs and prints what it says (the public verbs included)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import qcore

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(qcore.__path__, prefix="qcore.")
    if not info.name.startswith("qcore.testing.conformance")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_verb_has_an_example():
    for verb in ("prepare_pt2e", "prepare_qat_pt2e", "convert_pt2e", "move_exported_model_to_eval", "move_exported_model_to_train", "lower", "quantize", "compile"):
        doc = getattr(qcore, verb).__doc__ or ""
        assert ">>>" in doc, f"qcore.{verb} has no runnable example"
