"""Average pools: quantized by the default x86 recipe (torchao's int8-in-int8-out), kept float by
the ``sharing_recipe="sqnr"`` recipe, and then the report says why (not "no pattern matched")."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.annotation import keep_float, kept_float_reason


class ConvPoolLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_report_shows_the_average_pool_quantized_by_the_default_recipe() -> None:
    torch.manual_seed(0)
    model = ConvPoolLinear().eval()
    example = (torch.randn(2, 3, 10, 10),)
    result = qcore.quantize(model, example, backend="onednn", measure_latency=False)
    by_op = {node.op: node for node in result.report.nodes}
    assert by_op["aten.adaptive_avg_pool2d"].quantized and by_op["aten.flatten"].quantized
    assert by_op["aten.conv2d"].quantized and by_op["aten.linear"].quantized


def test_report_gives_the_sqnr_recipe_reason_for_a_float_average_pool() -> None:
    from qcore.app.report import build_report

    from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

    torch.manual_seed(0)
    example = (torch.randn(2, 3, 10, 10),)
    exported = torch.export.export(ConvPoolLinear().eval(), example).module()
    quantizer = X86InductorQuantizer(sharing_recipe="sqnr").set_global(get_default_x86_inductor_quantization_config())
    prepared = qcore.prepare_pt2e(exported, quantizer)
    prepared(*example)
    converted = qcore.convert_pt2e(prepared)
    report = build_report(exported, converted, None, "onednn", example, measure_latency=False)
    by_op = {node.op: node for node in report.nodes}
    pool = by_op["aten.adaptive_avg_pool2d"]
    assert not pool.quantized
    assert pool.reason.startswith("kept float by the onednn recipe: an average has a narrower range")
    assert by_op["aten.conv2d"].quantized and by_op["aten.linear"].quantized
    assert "kept float by the onednn recipe" in report.explain()


def test_keep_float_needs_a_reason() -> None:
    gm = torch.export.export(torch.nn.ReLU(), (torch.randn(2),)).module()
    relu = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert kept_float_reason(relu) is None
    with pytest.raises(ValueError, match="non-empty reason"):
        keep_float(relu, "")
    keep_float(relu, "because")
    assert kept_float_reason(relu) == "because"
