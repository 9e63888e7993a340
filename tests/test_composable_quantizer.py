"""Several quantizers on one model: later ones only add annotations."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.coverage import NothingAnnotatedWarning
from qcore.errors import AnnotationConflictError
from qcore.observers import MinMaxObserver
from qcore.testing.toy import ToyLinearQuantizer

qd = torch.ops.quantized_decomposed
ACT = qcore.QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=MinMaxObserver, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
SIGMOID_OUT = qcore.FixedQParamsQuantizationSpec(dtype=torch.int8, scale=1 / 256, zero_point=-128, quant_min=-128, quant_max=127)


class SigmoidQuantizer(qcore.Quantizer):
    """Adds sigmoid (input + fixed-range output); leaves everything else alone."""

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.target is torch.ops.aten.sigmoid.default and not is_annotated(node):
                annotate_input(node, node.args[0], ACT)
                annotate_output(node, SIGMOID_OUT)
                mark_annotated([node])
        return model

    def validate(self, model):
        return None


class Overwriter(qcore.Quantizer):
    """Rewrites the output spec of every linear: not allowed after another quantizer."""

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.target is torch.ops.aten.linear.default:
                annotate_output(node, ACT)
        return model

    def validate(self, model):
        return None


def model_and_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 4)).eval()
    return model, (torch.randn(4, 8),)


def test_composed_quantizers_each_add_their_ops():
    model, example = model_and_input()
    quantizer = qcore.ComposableQuantizer([ToyLinearQuantizer(), SigmoidQuantizer()])
    prepared = qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    assert prepared.meta["qcore_coverage"].by_op["linear"] == (2, 2)
    for _ in range(3):
        prepared(torch.randn(4, 8))
    converted = qcore.convert_pt2e(prepared)
    sigmoid = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
    q_after = next(iter(sigmoid.users))
    assert q_after.target is qd.quantize_per_tensor.default
    assert q_after.args[1:3] == (1 / 256, -128)
    with torch.no_grad():
        assert torch.allclose(model(*example), converted(*example), atol=0.05)


def test_a_later_quantizer_cannot_change_an_earlier_annotation():
    model, example = model_and_input()
    quantizer = qcore.ComposableQuantizer([ToyLinearQuantizer(), Overwriter()])
    with pytest.raises(AnnotationConflictError, match=r"quantizer 1 \(Overwriter\) of the ComposableQuantizer changed the output spec of node 'linear'"):
        qcore.prepare_pt2e(torch.export.export(model, example).module(), quantizer)


def test_validate_and_transform_run_for_every_quantizer():
    calls = []

    class Recording(SigmoidQuantizer):
        def transform_for_annotation(self, model):
            calls.append("transform")
            return model

        def validate(self, model):
            calls.append("validate")

    model, example = model_and_input()
    with pytest.warns(NothingAnnotatedWarning):  # the sigmoid quantizers find no sigmoid in this model
        qcore.prepare_pt2e(torch.export.export(model, example).module(), qcore.ComposableQuantizer([Recording(), Recording()]))
    assert calls == ["transform", "transform", "validate", "validate"]
