"""Keyword arguments of annotated ops: non-tensor kwargs (``approximate=``, ``dtype=``,
``device=``, ``pin_memory=``, a scalar ``max=``) pass through prepare and convert unchanged; a
tensor kwarg of an annotated op is refused with an error naming it, as torchao's prepare does
(it would go unobserved)."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.coverage import NothingAnnotatedWarning
from qcore.annotation import annotate_input, annotate_output, mark_annotated
from qcore.errors import PrepareError
from qcore.observers import MinMaxObserver
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationSpec

aten = torch.ops.aten
INT8 = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=MinMaxObserver, qscheme=torch.per_tensor_affine)


class EveryCallQuantizer(Quantizer):
    """Quantizes the float tensor inputs and the output of every call of ``targets``."""

    def __init__(self, targets: tuple) -> None:
        self.targets = targets

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in self.targets:
                continue
            for arg in node.args:
                if isinstance(arg, torch.fx.Node) and arg.meta["val"].dtype.is_floating_point:
                    annotate_input(node, arg, INT8)
            annotate_output(node, INT8)
            mark_annotated([node])
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        pass


class KwargsModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x, approximate="tanh")
        ones = torch.ones(x.shape, dtype=torch.float32, device=x.device, pin_memory=False)
        z = torch.clamp(y + ones, max=2.5)
        return torch.zeros_like(z, memory_format=torch.preserve_format) + z


def kwargs_of(model: torch.fx.GraphModule) -> dict:
    return {str(n.target): dict(n.kwargs) for n in model.graph.nodes if n.op == "call_function" and n.kwargs}


def test_non_tensor_kwargs_pass_through_prepare_and_convert():
    torch.manual_seed(0)
    model = KwargsModel()
    x = torch.randn(4, 8)
    exported = torch.export.export(model, (x,)).module()
    before = kwargs_of(exported)
    assert any("approximate" in k for k in before.values())  # the case is real: export kept the kwargs
    targets = (aten.gelu.default, aten.add.Tensor, aten.clamp.default, aten.ones.default, aten.zeros_like.default)
    prepared = qcore.prepare_pt2e(exported, EveryCallQuantizer(targets))
    prepared(x)
    converted = qcore.convert_pt2e(prepared)
    after = kwargs_of(converted)
    for target, kwargs in before.items():
        assert after[target] == kwargs
    quantizes = [n for n in converted.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target)]
    assert len(quantizes) >= 4  # gelu, both adds and clamp are quantized around
    expected = model(x)
    error = (converted(x) - expected).abs().max().item()
    assert error < 0.1, error  # a few int8 steps of a [-0.2, 3.5] range


class AddModel(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + y)


def test_a_tensor_kwarg_of_an_annotated_op_is_refused_by_name():
    exported = torch.export.export(AddModel(), (torch.randn(3), torch.randn(3))).module()
    add = next(n for n in exported.graph.nodes if n.target is aten.add.Tensor)
    x, y = add.args
    add.args, add.kwargs = (x,), {"other": y}  # add(x, other=y): the tensor reaches the op as a kwarg
    exported.recompile()

    class OutputOnly(Quantizer):
        def annotate(self, model):
            node = next(n for n in model.graph.nodes if n.target is aten.add.Tensor)
            annotate_input(node, node.args[0], INT8)
            annotate_output(node, INT8)
            mark_annotated([node])
            return model

        def validate(self, model):
            pass

    with pytest.raises(PrepareError, match=r"node 'add' \(aten.add.Tensor\) is annotated for quantization and takes the tensor 'y' as keyword argument 'other'"):
        qcore.prepare_pt2e(exported, OutputOnly())
    # the same op left unannotated is fine: nothing would go unobserved
    with pytest.warns(NothingAnnotatedWarning):  # relu is quantized; the add is not a quantized op
        prepared = qcore.prepare_pt2e(exported, EveryCallQuantizer((aten.relu.default,)))
    x, y = torch.randn(3), torch.randn(3)
    assert torch.allclose(prepared(x, y), torch.relu(x + y))
