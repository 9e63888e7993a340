"""qcore-xnnpack: int8 annotation for ExecuTorch's XNNPACK delegate, as a qcore plugin.

>>> from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config
>>> XNNPACKQuantizer().set_global(get_symmetric_quantization_config()).backend
'xnnpack'
"""

from __future__ import annotations

from qcore_xnnpack.config import get_symmetric_quantization_config
from qcore_xnnpack.quantizer import XNNPACKQuantizer

__all__ = ["XNNPACKQuantizer", "get_symmetric_quantization_config"]
