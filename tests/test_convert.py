"""convert_pt2e: the standard q/dq form, folding, dynamic specs, uncalibrated observers, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import qcore
from qcore import observers
from qcore.annotation import annotate_input, annotate_output, mark_annotated
from qcore.errors import CalibrationError, ConvertError, NotExportedError
from qcore.passes.insert_observers import QuantizationWarning
from qcore.spec import QuantizationConfig, QuantizationSpec
from qcore.testing.conformance import sqnr_db

qd = torch.ops.quantized_decomposed


def act_spec(dynamic: bool = False) -> QuantizationSpec:
    ctor = observers.PlaceholderObserver if dynamic else observers.MinMaxObserver
    return QuantizationSpec(
        dtype=torch.int8, observer_or_fake_quant_ctr=ctor, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine, is_dynamic=dynamic
    )


WEIGHT_PER_CHANNEL = QuantizationSpec(
    dtype=torch.int8,
    observer_or_fake_quant_ctr=observers.PerChannelMinMaxObserver,
    quant_min=-127,
    quant_max=127,
    qscheme=torch.per_channel_symmetric,
    ch_axis=0,
)
WEIGHT_PER_TENSOR = QuantizationSpec(
    dtype=torch.int8, observer_or_fake_quant_ctr=observers.MinMaxObserver, quant_min=-127, quant_max=127, qscheme=torch.per_tensor_symmetric
)


class LinearQuantizer(qcore.Quantizer):
    """Annotates aten.linear and aten.conv2d (input, weight, output) for the tests below."""

    def __init__(self, weight=WEIGHT_PER_CHANNEL, dynamic=False):
        self.config = QuantizationConfig(act_spec(dynamic), None if dynamic else act_spec(), weight, None)

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
                annotate_input(node, node.args[0], self.config.input_activation)
                annotate_input(node, node.args[1], self.config.weight)
                if self.config.output_activation is not None:
                    annotate_output(node, self.config.output_activation)
                mark_annotated([node])
        return model

    def validate(self, model):
        return None


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def count(gm, op):
    return sum(1 for t in targets(gm) if t == op)


def quantize(model, example, quantizer, calibrate=True, **convert_kwargs):
    exported = torch.export.export(model, example).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    if calibrate:
        for _ in range(3):
            prepared(*[torch.randn_like(t) for t in example])
    return prepared, qcore.convert_pt2e(prepared, **convert_kwargs)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()


def test_static_per_tensor_activation_uses_literal_qparams():
    prepared, converted = quantize(mlp(), (torch.randn(8, 16),), LinearQuantizer())
    first_q = next(n for n in converted.graph.nodes if n.target == qd.quantize_per_tensor.default)
    x_observer = next(n for n in prepared.graph.nodes if n.meta.get("qcore_observer") and n.args[0].op == "placeholder")
    observer = prepared.get_submodule(x_observer.target)
    scale, zero_point = observer.calculate_qparams()
    assert first_q.args[1:] == (float(scale), int(zero_point), -128, 127, torch.int8)
    # activations: x, linear0 output, the relu -> linear1 edge (relu is not annotated), linear1 output
    assert count(converted, qd.quantize_per_tensor.default) == 4
    assert count(converted, qd.dequantize_per_tensor.default) == 4
    # weights folded: int8 constants followed by dequantize_per_channel, no quantize_per_channel left
    assert count(converted, qd.quantize_per_channel.default) == 0
    assert count(converted, qd.dequantize_per_channel.default) == 2
    constants = [getattr(converted, n.target) for n in converted.graph.nodes if n.op == "get_attr" and n.target.endswith("_quantized")]
    assert len(constants) == 2 and all(c.dtype == torch.int8 for c in constants)
    assert not any(name.endswith("weight") for name, _ in converted.named_parameters())


def test_without_fold_quantize_the_weight_quantize_stays():
    _, converted = quantize(mlp(), (torch.randn(8, 16),), LinearQuantizer(), fold_quantize=False)
    assert count(converted, qd.quantize_per_channel.default) == 2


def test_per_tensor_weights_and_numerics_match_fake_quantization():
    model = mlp()
    example = (torch.randn(8, 16),)
    prepared, converted = quantize(model, example, LinearQuantizer(weight=WEIGHT_PER_TENSOR))
    assert count(converted, qd.dequantize_per_tensor.default) == 6  # 4 activations + 2 weights
    with torch.no_grad():
        assert sqnr_db(model(*example), converted(*example)) > 25  # per-tensor weights: coarser


def test_dynamic_activation_uses_choose_qparams():
    _, converted = quantize(mlp(), (torch.randn(8, 16),), LinearQuantizer(dynamic=True))
    assert count(converted, qd.choose_qparams.tensor) == 2
    assert count(converted, qd.quantize_per_tensor.tensor) == 2
    assert count(converted, qd.dequantize_per_tensor.tensor) == 2
    model = mlp()
    x = torch.randn(8, 16) * 3
    with torch.no_grad():
        assert sqnr_db(model(x), converted(x)) > 30


def test_conv_and_linear_model_reaches_30_db():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10)
    ).eval()
    example = (torch.randn(4, 3, 8, 8),)
    _, converted = quantize(model, example, LinearQuantizer())
    with torch.no_grad():
        assert sqnr_db(model(*example), converted(*example)) >= 30


def test_uncalibrated_activation_stays_float_with_a_warning_and_weights_still_quantize():
    model = mlp()
    example = (torch.randn(8, 16),)
    with pytest.warns(QuantizationWarning) as caught:
        _, converted = quantize(model, example, LinearQuantizer(), calibrate=False)
    messages = [str(w.message) for w in caught]
    assert "the observer of input edge 'input_1' -> 'linear' saw no calibration data; that point stays float" in messages[0]
    assert all("saw no calibration data" in m for m in messages) and len(messages) >= 2
    assert count(converted, qd.quantize_per_tensor.default) == 0
    assert count(converted, qd.dequantize_per_channel.default) == 2  # weights observed at convert
    with torch.no_grad():
        assert sqnr_db(model(*example), converted(*example)) > 30


def test_nan_in_calibration_data_names_the_node():
    exported = torch.export.export(mlp(), (torch.randn(8, 16),)).module()
    prepared = qcore.prepare_pt2e(exported, LinearQuantizer())
    bad = torch.randn(8, 16)
    bad[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"input edge 'input_1' -> 'linear'"):
        prepared(bad)


def test_convert_does_not_change_the_prepared_model():
    prepared, converted = quantize(mlp(), (torch.randn(8, 16),), LinearQuantizer())
    assert any(n.meta.get("qcore_observer") for n in prepared.graph.nodes)
    prepared(torch.randn(8, 16))  # still calibratable
    assert converted is not prepared


def test_convert_needs_a_prepared_model():
    exported = torch.export.export(mlp(), (torch.randn(8, 16),)).module()
    with pytest.raises(ConvertError, match=r"expects a model returned by prepare_pt2e"):
        qcore.convert_pt2e(exported)
    with pytest.raises(TypeError, match="use_reference_representation must be True or False"):
        qcore.convert_pt2e(exported, use_reference_representation="yes")


def test_a_model_that_is_not_exported_gets_the_way_to_export_it():
    with pytest.raises(NotExportedError, match=r"got Sequential; capture it first: `model = torch.export.export\(float_model"):
        qcore.prepare_pt2e(mlp(), LinearQuantizer())
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    traced = torch.fx.symbolic_trace(lambda x: torch.nn.functional.relu(x))
    with pytest.raises(NotExportedError, match=r"aten-level graph from torch.export, but node 'relu' calls"):
        qcore.prepare_pt2e(traced, LinearQuantizer())


def test_prepare_does_not_mutate_the_users_model():
    exported = torch.export.export(mlp(), (torch.randn(8, 16),)).module()
    before = {k: v.clone() for k, v in exported.state_dict().items()}
    graph_before = str(exported.graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_prepared = qcore.prepare_pt2e(exported, LinearQuantizer())
    quantize_prepared(torch.randn(8, 16))
    qcore.convert_pt2e(quantize_prepared)
    assert str(exported.graph) == graph_before
    assert not any("quantization_annotation" in n.meta for n in exported.graph.nodes)
    for key, value in exported.state_dict().items():
        assert torch.equal(value, before[key])


def test_torch_ao_observer_classes_work_in_specs():
    from torch.ao.quantization import observer as ao

    spec = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=ao.HistogramObserver, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    quantizer = LinearQuantizer()
    quantizer.config = QuantizationConfig(spec, spec, WEIGHT_PER_CHANNEL, None)
    model = mlp()
    example = (torch.randn(8, 16),)
    _, converted = quantize(model, example, quantizer)
    assert count(converted, qd.quantize_per_tensor.default) == 4
    with torch.no_grad():
        assert sqnr_db(model(*example), converted(*example)) > 25
