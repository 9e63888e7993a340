"""qcore-onednn-x86: x86 int8 annotation and lowering to oneDNN kernels, as a qcore plugin.

>>> import qcore
>>> from qcore_onednn_x86 import X86InductorQuantizer
>>> X86InductorQuantizer.backend
'onednn'
"""

from __future__ import annotations

from qcore_onednn_x86.quantizer import X86InductorQuantizer

__all__ = ["X86InductorQuantizer"]
