"""The ``reference`` backend, built into qcore: int8 linear and conv, lowered to nothing.

It exists so that the core alone runs end to end (``qcore.quantize(..., backend="reference")``)
and so that tests and docs have a backend that is always installed. Its "lowering" keeps the
q/dq program: the reference quantized program *is* the result, runnable anywhere torch runs.

>>> import torch, qcore
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
>>> result = qcore.quantize(model, (torch.randn(2, 8),), backend="reference", measure_latency=False)
>>> result.lowered is None, result.converted(torch.randn(2, 8)).shape
(True, torch.Size([2, 8]))
"""

from qcore.reference.config import get_reference_config
from qcore.reference.quantizer import ReferenceQuantizer

BACKEND = "reference"

__all__ = ["BACKEND", "ReferenceQuantizer", "get_reference_config"]
