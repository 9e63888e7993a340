"""The example plugin's own tests: run them where the plugin is installed (`pip install -e .`).

They use qcore's testing kit (the fixtures of qcore's pytest plugin, loaded through its
``pytest11`` entry point, and ``requires_backend``), as any third-party plugin's suite can."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.testing import requires_backend

pytest.importorskip("qcore_example_sigmoid")
from qcore_example_sigmoid.annotate_sigmoid import SIGMOID_OUTPUT_SPEC, annotate_sigmoid  # noqa: E402


class LinearSigmoid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


@pytest.fixture(autouse=True)
def fresh_plugin_manager(qcore_plugin_manager):
    return qcore_plugin_manager


def test_plugin_contributes_its_annotator_to_each_backend_it_serves():
    manager = qcore.get_plugin_manager()
    for backend in ("xnnpack", "onednn", "reference"):
        ours = [a for a in manager.annotators(backend) if a.plugin == "example_sigmoid"]
        assert [a.name for a in ours] == ["example_sigmoid"]
    assert [a for a in manager.annotators("some_other_backend") if a.plugin == "example_sigmoid"] == []


def test_annotator_sets_fixed_output_and_config_input():
    from qcore.testing.toy import toy_linear_config

    config = toy_linear_config()
    gm = torch.export.export(LinearSigmoid(), (torch.randn(2, 8),)).module()
    partitions = annotate_sigmoid(gm, config)
    assert len(partitions) == 1
    sigmoid = partitions[0][0]
    annotation = sigmoid.meta["quantization_annotation"]
    assert annotation.output_qspec is SIGMOID_OUTPUT_SPEC
    assert list(annotation.input_qspec_map.values()) == [config.input_activation]
    assert annotate_sigmoid(gm, config) == []  # already claimed: nothing more to do


@requires_backend("reference")
def test_sigmoid_is_quantized_on_the_reference_backend(quantize_for_test, assert_graph_ops):
    result = quantize_for_test(LinearSigmoid().eval(), (torch.randn(4, 8),), backend="reference")
    # linear: input, output (its sigmoid input is shared); sigmoid: its fixed-qparams output
    assert_graph_ops(result.converted, {"quantize_per_tensor": 3, "sigmoid": 1})
    sigmoid = next(n for n in result.converted.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
    (quantize,) = sigmoid.users
    assert quantize.args[1:4] == (1.0 / 256.0, -128, -128)


@requires_backend("xnnpack")
def test_sigmoid_is_quantized_end_to_end_with_xnnpack():
    xnnpack = pytest.importorskip("qcore_xnnpack")
    quantizer = xnnpack.XNNPACKQuantizer().set_global(xnnpack.get_symmetric_quantization_config())
    example = (torch.randn(4, 8),)
    prepared = qcore.prepare_pt2e(torch.export.export(LinearSigmoid(), example).module(), quantizer)
    prepared(*example)
    converted = qcore.convert_pt2e(prepared)
    sigmoid = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
    assert "dequantize" in str(sigmoid.args[0].target)
    (quantize,) = sigmoid.users
    assert "quantize_per_tensor" in str(quantize.target)
    assert quantize.args[1:4] == (1.0 / 256.0, -128, -128)
