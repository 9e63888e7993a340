"""GPT-2's ``Conv1D`` form on x86: ``addmm(bias, x.view(-1, in), w[in, out])`` is a linear.

The annotator (``annotators/addmm.py``) quantizes the activation and the weight (per channel on
axis 1 for ``[in, out]``, axis 0 for ``addmm(b, x, w.t())``), keeps the bias float; the oneDNN
lowering turns each into one ``qlinear_pointwise``. The real GPT-2 is in
``tests/test_real_architectures_x86.py``.
"""

from __future__ import annotations

import pytest
import torch

from qcore.annotation import ANNOTATION_KEY

from _onednn_helpers import aten, assert_close_to_reference, calls, count, counters, export, lower, onednn, qd, qdq_count, quantize, x86_quantizer

from qcore_onednn_x86 import get_default_x86_inductor_quantization_config
from qcore_onednn_x86.annotators.addmm import addmm_weight
from qcore_onednn_x86.annotators.common import is_linear_like


class Conv1D(torch.nn.Module):
    """Hugging Face's ``Conv1D``, written here: weight ``[in, out]``, ``addmm`` on the flattened input."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class MLP(torch.nn.Module):
    """GPT-2's MLP block shape: ln -> c_fc -> relu -> c_proj, plus the residual."""

    def __init__(self, d=16):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)

    def forward(self, x):
        return x + self.c_proj(torch.relu(self.c_fc(self.ln(x))))


class TransposedAddmm(torch.nn.Module):
    """``addmm(b, x, w.t())`` with ``w`` stored ``[out, in]`` (what a 2-D linear decomposes to)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(16) * 0.1)

    def forward(self, x):
        return torch.addmm(self.b, x, self.w.t())


EXAMPLE = (torch.randn(2, 5, 16),)


def _annotated(model, example, config=None):
    gm = export(model, example)
    x86_quantizer(config).annotate(gm)
    return gm


def test_conv1d_addmm_is_annotated_as_a_linear_with_the_weight_on_axis_1():
    gm = _annotated(MLP(), EXAMPLE)
    config = get_default_x86_inductor_quantization_config()
    first, second = calls(gm, aten.addmm.default)
    for addmm in (first, second):
        assert is_linear_like(addmm) and addmm_weight(addmm).ch_axis == 1
        specs = addmm.meta[ANNOTATION_KEY].input_qspec_map
        bias, x, w = addmm.args
        assert specs[x] == config.input_activation and x.target == aten.view.default
        assert (specs[w].dtype, specs[w].qscheme, specs[w].ch_axis) == (torch.int8, torch.per_channel_symmetric, 1)
        assert specs[bias] is None
        assert addmm.meta[ANNOTATION_KEY]._annotated


def test_conv1d_mlp_quantizes_and_lowers_to_two_qlinears():
    torch.manual_seed(0)
    converted = quantize(MLP(), EXAMPLE)
    # per addmm: q + dq of the flattened activation and the weight's dq_pc (bias float)
    assert count(converted, qd.quantize_per_tensor.default) == 2
    assert count(converted, qd.dequantize_per_tensor.default) == 2
    assert [n.args[3] for n in calls(converted, qd.dequantize_per_channel.default)] == [1, 1]
    assert qdq_count(converted) == 6
    lowered = lower(converted, EXAMPLE)
    qlinears = calls(lowered, onednn.qlinear_pointwise.default)
    assert len(qlinears) == 2 and count(lowered, aten.addmm.default, aten.mm.default, aten.t.default) == 0
    assert qdq_count(lowered) == 2  # the two input quantizes
    assert counters(lowered)["qlinear_weight_prepack_matcher_count"] == 2
    # the input quantize is lifted over the flattening view: the qlinear reads a uint8 view
    for qlinear in qlinears:
        assert qlinear.args[0].target == aten.view.default
        assert qlinear.args[0].args[0].target == qd.quantize_per_tensor.default
    assert_close_to_reference(converted, lowered, EXAMPLE)


def test_transposed_weight_addmm_is_quantized_on_axis_0_with_its_transpose():
    example = (torch.randn(4, 8),)
    gm = _annotated(TransposedAddmm(), example)
    (addmm,) = calls(gm, aten.addmm.default)
    (t,) = calls(gm, aten.t.default)
    assert addmm_weight(addmm).ch_axis == 0 and addmm_weight(addmm).transpose is t
    assert t.meta[ANNOTATION_KEY].input_qspec_map[t.args[0]].ch_axis == 0 and t.meta[ANNOTATION_KEY]._annotated
    converted = quantize(TransposedAddmm(), example)
    assert qdq_count(converted) == 3
    lowered = lower(converted, example)
    assert count(lowered, onednn.qlinear_pointwise.default) == 1 and count(lowered, aten.addmm.default) == 0
    assert_close_to_reference(converted, lowered, example)


def test_dynamic_config_lowers_conv1d_to_the_tensor_overload():
    config = get_default_x86_inductor_quantization_config(is_dynamic=True)
    converted = quantize(MLP(), EXAMPLE, x86_quantizer(config))
    assert count(converted, qd.choose_qparams.tensor) == 2
    lowered = lower(converted, EXAMPLE)
    assert count(lowered, onednn.qlinear_pointwise.tensor) == 2 and count(lowered, aten.addmm.default) == 0
    assert_close_to_reference(converted, lowered, EXAMPLE)


def test_qat_leaves_the_in_out_weight_float_and_takes_the_transposed_one():
    config = get_default_x86_inductor_quantization_config(is_qat=True)
    gm = _annotated(MLP(), EXAMPLE, config)
    assert all(ANNOTATION_KEY not in n.meta for n in calls(gm, aten.addmm.default))
    gm = _annotated(TransposedAddmm(), (torch.randn(4, 8),), config)
    (t,) = calls(gm, aten.t.default)
    assert t.meta[ANNOTATION_KEY].input_qspec_map[t.args[0]].ch_axis == 0


class NotLinear(torch.nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.w = torch.nn.Parameter(torch.randn(8, 16))
        self.b = torch.nn.Parameter(torch.randn(16))
        self.b2 = torch.nn.Parameter(torch.randn(4, 16))

    def forward(self, x, y):
        if self.form == "beta":
            return torch.addmm(self.b, x, self.w, beta=0.5)
        if self.form == "matrix_bias":
            return torch.addmm(self.b2, x, self.w)
        return torch.addmm(self.b, x, y)  # two activations


@pytest.mark.parametrize("form", ["beta", "matrix_bias", "activations"])
def test_addmm_that_is_not_a_linear_is_left_alone(form):
    example = (torch.randn(4, 8), torch.randn(8, 16))
    gm = _annotated(NotLinear(form), example)
    (addmm,) = calls(gm, aten.addmm.default)
    assert addmm_weight(addmm) is None and ANNOTATION_KEY not in addmm.meta
