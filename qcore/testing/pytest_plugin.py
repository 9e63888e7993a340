"""qcore's pytest plugin (entry point ``pytest11``: loaded wherever qcore is installed), with
the fixtures a backend plugin's test suite needs.

Fixtures:

* ``qcore_plugin_manager``: a fresh process-wide plugin manager for the test (strict: a plugin
  that fails to load is an error), the previous one put back afterwards.
* ``register_qcore_plugin``: ``register_qcore_plugin(module_or_object, name)`` registers a
  plugin for one test only (on the fresh manager), as an installed entry point would.
* ``assert_graph_ops``: ``assert_graph_ops(gm, {"quantize_per_tensor": 2})`` (see
  :func:`qcore.testing.graph_ops.assert_graph_ops`).
* ``quantize_for_test``: ``quantize_for_test(model, example_inputs, backend, qat=False)``
  quantizes with the backend's default config on seeded random calibration data and returns the
  ``QuantizeResult`` (no latency measured).

Options: ``--qcore-strict-plugins`` or the ini setting ``qcore_strict_plugins = true`` make the
whole session strict (as ``QCORE_STRICT_PLUGINS=1``); the default leaves the environment alone,
so installing qcore changes no other project's tests.

The conformance suite (``qcore.testing.conformance.BackendConformance``) and
``qcore.testing.requires_backend`` complete the kit::

    from qcore.testing import requires_backend

    @requires_backend("mybackend")
    def test_my_annotator(quantize_for_test, assert_graph_ops):
        result = quantize_for_test(MyModel().eval(), (torch.randn(1, 8),), backend="mybackend")
        assert_graph_ops(result.converted, {"quantize_per_tensor": 2})
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Optional

import pytest

from qcore.plugin_manager import STRICT_ENV, QcorePluginManager, set_plugin_manager


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qcore")
    group.addoption(
        "--qcore-strict-plugins", action="store_true", default=False,
        help=f"a qcore plugin that fails to load is an error (sets {STRICT_ENV}=1 for the session)",
    )
    parser.addini("qcore_strict_plugins", type="bool", default=False, help=f"as --qcore-strict-plugins ({STRICT_ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("qcore_strict_plugins", False) or config.getini("qcore_strict_plugins"):
        os.environ.setdefault(STRICT_ENV, "1")
    config.addinivalue_line("markers", "requires_backend(name): skip unless the qcore backend is installed and available")


@pytest.fixture
def qcore_plugin_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[QcorePluginManager]:
    """A fresh, strict process-wide plugin manager for this test."""
    monkeypatch.setenv(STRICT_ENV, "1")
    manager = QcorePluginManager()
    previous = set_plugin_manager(manager)
    try:
        yield manager
    finally:
        set_plugin_manager(previous)


@pytest.fixture
def register_qcore_plugin(qcore_plugin_manager: QcorePluginManager) -> Callable[..., Any]:
    """``register_qcore_plugin(plugin, name)``: register a module or object of hook
    implementations for this test; the fresh manager is dropped afterwards."""

    def register(plugin: Any, name: str) -> Any:
        qcore_plugin_manager.register(plugin, name)
        return plugin

    return register


@pytest.fixture
def assert_graph_ops() -> Callable[..., None]:
    from qcore.testing.graph_ops import assert_graph_ops as check

    return check


@pytest.fixture
def quantize_for_test() -> Callable[..., Any]:
    def run(model: Any, example_inputs: tuple, backend: str, qat: bool = False, batches: int = 4, **options: Any) -> Any:
        import torch

        import qcore

        generator = torch.Generator().manual_seed(0)
        calibration: Optional[list[tuple[Any, ...]]] = [
            tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype) if t.is_floating_point() else t for t in example_inputs)
            for _ in range(batches)
        ]
        if qat:
            options.setdefault("train_fn", lambda prepared: None)
            calibration = None
        return qcore.quantize(
            model, example_inputs, backend=backend, calibration=calibration, qat=qat, measure_latency=False, **options
        )

    return run
