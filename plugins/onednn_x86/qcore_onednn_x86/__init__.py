"""qcore-onednn-x86: x86 int8 annotation and lowering to oneDNN kernels, as a qcore plugin.

Importing this package is cheap (no Inductor, no observers)::

    import torch, qcore
    from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    prepared(*example)                                      # calibrate
    converted = qcore.convert_pt2e(prepared)
    lowered = qcore.lower(converted, backend="onednn", example_inputs=example)

>>> from qcore_onednn_x86 import X86InductorQuantizer
>>> X86InductorQuantizer.backend
'onednn'
"""

from __future__ import annotations

from qcore_onednn_x86.config import get_default_x86_inductor_quantization_config, get_x86_inductor_linear_dynamic_fp16_config
from qcore_onednn_x86.quantizer import X86InductorQuantizer

__all__ = ["X86InductorQuantizer", "get_default_x86_inductor_quantization_config", "get_x86_inductor_linear_dynamic_fp16_config"]
