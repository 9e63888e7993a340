"""``X86InductorQuantizer``: the quantizer for the ``onednn`` backend.

Its annotators come from every plugin serving the backend ``"onednn"`` (this plugin's x86
recipe first of all): uint8 affine per-tensor activations, int8 symmetric per-channel weights.

>>> from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
>>> q = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
>>> q.backend
'onednn'
"""

from __future__ import annotations

from typing import ClassVar, Optional

import qcore


class X86InductorQuantizer(qcore.BackendQuantizer):
    """Annotates an exported model for x86 int8 inference through oneDNN.

    Same setters as the old ``torch.ao`` X86InductorQuantizer: ``set_global``,
    ``set_operator_type``, ``set_module_type``, ``set_module_name``.
    """

    backend: ClassVar[str] = "onednn"

    @classmethod
    def default_config(cls, is_qat: bool = False, target: Optional[str] = None) -> "qcore.QuantizationConfig":
        """The backend's default config (what ``qcore.quantize`` uses when given none), exact on
        ``target`` (one of ``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx2"``; None: this CPU).

        >>> X86InductorQuantizer.default_config(target="avx2").weight.quant_max
        91
        """
        from qcore_onednn_x86.config import get_default_x86_inductor_quantization_config

        return get_default_x86_inductor_quantization_config(is_qat=is_qat, target=target)
