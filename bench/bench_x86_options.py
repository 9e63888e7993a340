"""The onednn quantizer's options beyond torchao's recipe, side by side with the default.

Not a test. For each model: SQNR (dB) of the lowered int8 program against the float model on
held-out batches, and the number of quantize ops, for the default ``X86InductorQuantizer()``
(torchao's program) and each option (``qcore.quantize(..., quantizer_options=...)``):

* ``sharing_recipe="sqnr"`` on ``bench/bench_onednn.py``'s ResNet-style CNN;
* ``conv1d_conv3d=True`` on a conv1d + GELU front end (4 convs over 16,000 samples, a linear).

Usage::

    python bench/bench_x86_options.py
    python bench/bench_x86_options.py --target avx512_vnni    # the full 8-bit config on any CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

import qcore
from qcore.metrics import sqnr_db

sys.path.insert(0, os.path.dirname(__file__))
from bench_onednn import ResNetStyle  # noqa: E402


class Conv1dFrontEnd(torch.nn.Module):
    """A speech front end: conv1d + GELU x 4 (stride 2), then a linear over time steps."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv1d(1 if i == 0 else 64, 64, 5 if i == 0 else 3, stride=2) for i in range(4))
        self.fc = torch.nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.nn.functional.gelu(conv(x))
        return self.fc(x.transpose(1, 2))


MODELS = {
    "cnn": (ResNetStyle, (2, 3, 64, 64), [("sharing_recipe='sqnr'", {"sharing_recipe": "sqnr"})]),
    "conv1d": (Conv1dFrontEnd, (1, 1, 16000), [("conv1d_conv3d=True", {"conv1d_conv3d": True})]),
}


def quantize_count(model: torch.fx.GraphModule) -> int:
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="the default config made for this CPU kind (amx, avx512_vnni, avx_vnni, avx2)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'model':8s} {'quantizer':24s} {'SQNR dB':>8s} {'quantizes':>9s}")
    for name, (factory, shape, options) in MODELS.items():
        torch.manual_seed(0)
        model = factory().eval()
        calibration = [(torch.randn(*shape),) for _ in range(4)]
        held_out = [(torch.randn(*shape),) for _ in range(2)]
        for label, extra in [("default", {}), *options]:
            result = qcore.quantize(model, calibration[0], backend="onednn", calibration=calibration, measure_latency=False,
                                    target=args.target, quantizer_options=extra or None)
            with torch.no_grad():
                expected = torch.cat([model(*b).flatten() for b in held_out])
                actual = torch.cat([result.lowered(*b).flatten() for b in held_out])
            print(f"{name:8s} {label:24s} {sqnr_db(expected, actual):8.2f} {quantize_count(result.converted):9d}")


if __name__ == "__main__":
    main()
