"""Whether oneDNN int8 kernels can run in this process.

>>> from qcore_onednn_x86.availability import onednn_unavailable_reason
>>> onednn_unavailable_reason() is None or isinstance(onednn_unavailable_reason(), str)
True
"""

from __future__ import annotations

from typing import Optional

REQUIRED_OPS = (
    ("onednn", "qconv_prepack"),
    ("onednn", "qconv2d_pointwise"),
    ("onednn", "qlinear_prepack"),
    ("onednn", "qlinear_pointwise"),
    ("quantized", "max_pool2d"),
)


def onednn_unavailable_reason() -> Optional[str]:
    """None if torch was built with oneDNN and has its int8 ops, else a sentence saying why not."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    missing = []
    for namespace, name in REQUIRED_OPS:
        try:
            getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            missing.append(f"torch.ops.{namespace}.{name}")
    if missing:
        return f"this torch build lacks the oneDNN int8 ops {', '.join(missing)}"
    return None
