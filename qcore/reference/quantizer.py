"""``ReferenceQuantizer``: the quantizer of the built-in ``reference`` backend.

>>> import torch, qcore
>>> from qcore.reference import ReferenceQuantizer
>>> gm = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).module()
>>> prepared = qcore.prepare_pt2e(gm, ReferenceQuantizer().set_global(ReferenceQuantizer.default_config()))
>>> _ = prepared(torch.randn(2, 4))
>>> converted = qcore.convert_pt2e(prepared)
>>> sum(n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default for n in converted.graph.nodes)
2
"""

from __future__ import annotations

from typing import ClassVar

from qcore.quantizer import BackendQuantizer
from qcore.reference.config import get_reference_config
from qcore.spec import QuantizationConfig


class ReferenceQuantizer(BackendQuantizer):
    """Annotates linear and conv (with a following relu fused) through the ``annotate_op`` hook."""

    backend: ClassVar[str] = "reference"

    @staticmethod
    def default_config(is_qat: bool = False) -> QuantizationConfig:
        """The config ``qcore.quantize(..., backend="reference")`` uses."""
        return get_reference_config(is_qat=is_qat)
