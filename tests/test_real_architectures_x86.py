"""GPT-2 (small random-init ``transformers`` config) on x86: its ``Conv1D`` projections
(``addmm(bias, x.view(-1, in), w[in, out])``) are quantized and lowered to oneDNN int8 linears.

Skips without ``transformers``; counts are those of transformers 5.25.0's graph (2 layers: 4
``Conv1D`` each). Measured on an AVX2 CPU without VNNI (pair-safe ranges): q/dq SQNR vs float
33.6 dB (lowest of 4 evaluation batches), lowered vs q/dq 136 dB. torchao 0.18.0's
X86InductorQuantizer quantizes only 4 inputs of the GELUs' muls (8 q/dq, 45.6 dB): it
leaves every projection float.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("qcore_onednn_x86")

import _real_architectures as ra  # noqa: E402
import qcore  # noqa: E402
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config  # noqa: E402

QLINEAR = torch.ops.onednn.qlinear_pointwise.default


def _calibrated(prepare, quantizer, model):
    prepared = prepare(ra.export(model), quantizer)
    for batch in ra.token_batches(4, seed=1):
        prepared(*batch)
    return prepared


def test_gpt2_conv1d_projections_are_quantized_and_lowered_to_int8_linears():
    model = ra.build("gpt2")
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    converted = qcore.convert_pt2e(_calibrated(qcore.prepare_pt2e, quantizer, model))
    addmms = [n for n in converted.graph.nodes if n.target == torch.ops.aten.addmm.default]
    assert len(addmms) == 8
    assert all(n.args[2].target == torch.ops.quantized_decomposed.dequantize_per_channel.default for n in addmms)
    assert all(n.args[2].args[3] == 1 for n in addmms)  # [in, out] weight: output channels on axis 1
    # 8 projections x (activation q + dq, weight dq_pc) = 24; the GELU muls' 4 inputs x (q + dq) = 8;
    # the 2 views before c_proj share the mul's quantization, (q + dq) each = 4
    assert ra.qdq_count(converted) == 36
    lowered = qcore.lower(converted, "onednn")
    ops = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert ops.count(QLINEAR) == 8 and torch.ops.aten.addmm.default not in ops
    with torch.no_grad():
        batches = ra.token_batches(4, seed=2)
        qdq_db = [ra.sqnr_db(model(*b), converted(*b)) for b in batches]
        lowered_db = [ra.sqnr_db(converted(*b), lowered(*b)) for b in batches]
    assert min(qdq_db) > 32.0, qdq_db
    assert min(lowered_db) > 100.0, lowered_db


@pytest.mark.torchao
def test_gpt2_quantizes_the_projections_torchao_leaves_float():
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model = ra.build("gpt2")
    peer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    theirs = convert_pt2e(_calibrated(prepare_pt2e, peer, model))
    ours = qcore.convert_pt2e(_calibrated(
        qcore.prepare_pt2e, X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config()), model))
    float_addmm_weights = [n for n in theirs.graph.nodes if n.target == torch.ops.aten.addmm.default and n.args[2].op == "get_attr"]
    assert len(float_addmm_weights) == 8  # torchao: every Conv1D float
    assert (ra.qdq_count(theirs), ra.qdq_count(ours)) == (8, 36)
