"""The plugin's hook implementations (entry point ``example_sigmoid`` in group ``qcore``).

Only ``@qcore.hookimpl`` functions live here; the annotator is in ``annotate_sigmoid.py``.
"""

from __future__ import annotations

import qcore

BACKENDS = ("xnnpack", "onednn", "reference")


@qcore.hookimpl
def annotate_op(backend: str) -> list:
    if backend not in BACKENDS:
        return []
    from qcore_example_sigmoid.annotate_sigmoid import annotate_sigmoid

    return [qcore.Annotator(name="example_sigmoid", fn=annotate_sigmoid)]
