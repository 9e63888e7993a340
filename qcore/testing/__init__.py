"""qcore's testing kit, for qcore's own tests and for every backend plugin's.

* :mod:`qcore.testing.pytest_plugin`: fixtures (loaded by pytest through the ``pytest11``
  entry point): ``qcore_plugin_manager``, ``register_qcore_plugin``, ``assert_graph_ops``,
  ``quantize_for_test``.
* :mod:`qcore.testing.conformance`: ``BackendConformance``, the suite every backend runs.
* :mod:`qcore.testing.graph_ops`: ``op_counts`` / ``assert_graph_ops``.
* :func:`requires_backend`: skip a test or class unless a backend is installed and available.
* :mod:`qcore.testing.toy`: a self-contained quantizer for docs and tests.

>>> requires_backend("reference").name
'skipif'
"""

from __future__ import annotations

from typing import Any


def backend_unavailable_reason(name: str) -> "str | None":
    """None if backend ``name`` is installed and can run here, else a sentence saying why not."""
    from qcore.errors import QcoreError
    from qcore.plugin_manager import get_plugin_manager

    try:
        get_plugin_manager().get_backend(name)
    except QcoreError as exc:
        return str(exc)
    return None


def requires_backend(name: str) -> Any:
    """``@requires_backend("onednn")``: a pytest ``skipif`` mark with the reason the backend is missing."""
    import pytest

    reason = backend_unavailable_reason(name)
    return pytest.mark.skipif(reason is not None, reason=f"needs the {name} backend: {reason}")


__all__ = ["backend_unavailable_reason", "requires_backend"]
