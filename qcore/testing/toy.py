"""A self-contained quantizer for docs and tests: int8 linear, per-channel weights.

It annotates ``aten.linear`` directly, without plugins, so examples run anywhere qcore is
installed.

>>> ToyLinearQuantizer().is_qat
False
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from qcore.annotation import annotate_input, annotate_output, is_annotated, mark_annotated
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationConfig, QuantizationSpec


def toy_linear_config(is_qat: bool = False) -> QuantizationConfig:
    """int8 affine activations (min-max), int8 symmetric per-channel weights."""
    from torch.ao.quantization import observer as ao_observer
    from torch.ao.quantization import fake_quantize as ao_fq

    act_ctr = ao_fq.FakeQuantize.with_args(observer=ao_observer.MovingAverageMinMaxObserver) if is_qat else ao_observer.MinMaxObserver
    weight_ctr = (
        ao_fq.FakeQuantize.with_args(observer=ao_observer.MovingAveragePerChannelMinMaxObserver)
        if is_qat
        else ao_observer.PerChannelMinMaxObserver
    )
    act = QuantizationSpec(
        dtype=torch.int8, observer_or_fake_quant_ctr=act_ctr, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        observer_or_fake_quant_ctr=weight_ctr,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return QuantizationConfig(act, act, weight, None, is_qat)


class ToyLinearQuantizer(Quantizer):
    """Annotates every ``aten.linear``: input, weight and output quantized."""

    def __init__(self, is_qat: bool = False) -> None:
        self.is_qat = is_qat
        self.config = toy_linear_config(is_qat)

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
                continue
            x, weight = node.args[0], node.args[1]
            if is_annotated([node]):
                continue
            annotate_input(node, x, self.config.input_activation)
            annotate_input(node, weight, self.config.weight)
            annotate_output(node, self.config.output_activation)
            mark_annotated([node, weight])
        return model

    def validate(self, model: GraphModule) -> None:
        return None
