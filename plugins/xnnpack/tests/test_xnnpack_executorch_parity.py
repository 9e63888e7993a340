"""The program ExecuTorch 1.5.1's ``XNNPACKQuantizer`` makes, on the ops where qcore followed it.

Found by the differential fuzzer (issue 21, kind a: qcore diverged): ExecuTorch's quantizer
shares the producer's observer through ``relu``, ``max_pool2d``, ``transpose.int``,
``reshape``, ``slice.Tensor`` and ``dropout`` (the older list of torch.ao / torchao's test
quantizer does not), and quantizes conv3d, ``padding="same"`` convs and conv_transpose3d.
The q/dq counts are asserted here by hand; where ExecuTorch is installed (``tox -e peers``
style environments) the same models are run through its quantizer and must match.
"""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.metrics import sqnr_db
from qcore.testing.graph_ops import op_counts
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config


class Conv3dAndSequence(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = torch.nn.Conv3d(3, 4, 3)
        self.up3d = torch.nn.ConvTranspose3d(4, 2, 2)
        self.same = torch.nn.Conv2d(3, 4, 3, padding="same")

    def forward(self, volume, image):
        up = self.up3d(torch.relu(self.conv3d(volume)))
        keys = self.same(image).transpose(2, 3).reshape(1, 4, -1)
        return up, keys[:, :2], torch.nn.functional.dropout(keys, 0.1, training=False)


class ReluPoolChain(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.conv(x) + 1.0), 2)
        return self.fc(y.flatten(2).transpose(1, 2))


CASES = {
    # conv3d, conv_transpose3d and the same-padding conv quantized; the sequence ops share
    "conv3d_and_sequence": (Conv3dAndSequence, (torch.randn(1, 3, 6, 6, 6), torch.randn(1, 3, 8, 8)),
                            {"quantize_per_tensor": 9, "dequantize_per_tensor": 10, "dequantize_per_channel": 3}),
    "relu_pool_chain": (ReluPoolChain, (torch.randn(1, 3, 8, 8),), None),
}


def _qdq_counts(converted: torch.fx.GraphModule) -> dict:
    return {name: n for name, n in sorted(op_counts(converted).items()) if "quantize" in name}


def _calibrated(prepare, convert, quantizer, model_class, inputs) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    prepared = prepare(torch.export.export(model_class().eval(), inputs).module(), quantizer)
    with torch.no_grad():
        prepared(*inputs)
    return convert(prepared)


def _qcore(model_class, inputs) -> torch.fx.GraphModule:
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    return _calibrated(qcore.prepare_pt2e, qcore.convert_pt2e, quantizer, model_class, inputs)


def test_conv3d_padding_same_and_conv_transpose3d_are_quantized():
    model_class, inputs, expected = CASES["conv3d_and_sequence"]
    converted = _qcore(model_class, inputs)
    assert _qdq_counts(converted) == expected
    torch.manual_seed(0)
    with torch.no_grad():
        reference, ours = model_class().eval()(*inputs), converted(*inputs)
    for r, o in zip(reference, ours):
        assert sqnr_db(r, o) > 25


@pytest.mark.executorch
@pytest.mark.parametrize("case", list(CASES))
def test_same_qdq_counts_and_outputs_as_executorchs_quantizer(case):
    et_quantizer = pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model_class, inputs, _ = CASES[case]
    theirs = _calibrated(prepare_pt2e, convert_pt2e,
                         et_quantizer.XNNPACKQuantizer().set_global(et_quantizer.get_symmetric_quantization_config(is_per_channel=True)),
                         model_class, inputs)
    ours = _qcore(model_class, inputs)
    assert _qdq_counts(ours) == _qdq_counts(theirs)
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(ours(*inputs)), torch.utils._pytree.tree_leaves(theirs(*inputs))):
            assert torch.allclose(a, b, atol=1e-5)
