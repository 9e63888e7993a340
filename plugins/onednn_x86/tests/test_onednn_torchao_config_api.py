"""X86InductorQuantizer's torchao configuration API: set_module_name_qconfig,
set_module_type_qconfig, set_function_type_qconfig, get_global_quantization_config, their
precedence (module name over module/function type over global, None keeping a scope float),
torchao's refusal of mixed QAT/PTQ and static/dynamic configs, and the annotation flag
``_is_output_of_quantized_pattern``. Where torchao is installed, each scope gives the same q/dq
counts as torchao's own X86InductorQuantizer on the same model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcore
from qcore.metrics import sqnr_db
from qcore.testing.graph_ops import op_counts, op_name
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class ConvBlockPoolLinear(nn.Module):
    """conv -> block(conv -> relu) -> max_pool2d -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.block(self.conv(x))), 1))


EXAMPLE = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def static(is_qat: bool = False) -> qcore.QuantizationConfig:
    return get_default_x86_inductor_quantization_config(is_qat=is_qat, target="avx512_vnni")  # torchao's ranges


def dynamic() -> qcore.QuantizationConfig:
    return get_default_x86_inductor_quantization_config(is_dynamic=True, target="avx512_vnni")


# scope setup (applied to qcore's quantizer and to torchao's) -> (quantize_per_tensor, dequantize_per_channel)
SCOPES = {
    "global": (lambda q, c: q.set_global(c), (5, 3)),
    "module type Linear None": (lambda q, c: q.set_global(c).set_module_type_qconfig(nn.Linear, None), (5, 2)),
    "module name block None": (lambda q, c: q.set_global(c).set_module_name_qconfig("block", None), (2, 2)),
    "module name over module type": (
        lambda q, c: q.set_global(c).set_module_type_qconfig(nn.Conv2d, None).set_module_name_qconfig("block", c),
        (4, 2),
    ),
    "function type F.linear only": (lambda q, c: q.set_function_type_qconfig(F.linear, c), (1, 1)),
    "function type max_pool2d None": (lambda q, c: q.set_global(c).set_function_type_qconfig(F.max_pool2d, None), (3, 3)),
}


def convert_with(prepare, convert, quantizer, model: nn.Module) -> torch.fx.GraphModule:
    prepared = prepare(torch.export.export(model, EXAMPLE).module(), quantizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        prepared(torch.randn(EXAMPLE[0].shape, generator=generator))
    return convert(prepared)


def qdq_counts(converted: torch.fx.GraphModule) -> tuple[int, int]:
    """(quantize_per_tensor, dequantize_per_channel) counts."""
    counts = op_counts(converted)
    return counts.get("quantize_per_tensor", 0), counts.get("dequantize_per_channel", 0)


def dequantized_inputs(converted: torch.fx.GraphModule) -> dict[str, bool]:
    """For each compute op: is its activation input a dequantize (does it run on int8 inputs)?"""
    ops = {"conv2d", "conv2d_1", "max_pool2d", "flatten", "linear"}
    return {
        n.name: isinstance(n.args[0], torch.fx.Node) and "dequantize" in str(n.args[0].target)
        for n in converted.graph.nodes
        if n.op == "call_function" and n.name in ops
    }


@pytest.mark.parametrize("scope", list(SCOPES))
def test_each_scope_quantizes_what_torchaos_recipe_does(scope):
    setup, expected = SCOPES[scope]
    torch.manual_seed(0)
    converted = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, setup(X86InductorQuantizer(), static()), ConvBlockPoolLinear().eval())
    assert qdq_counts(converted) == expected


def test_none_scopes_keep_exactly_their_ops_float():
    torch.manual_seed(0)
    model = ConvBlockPoolLinear().eval()
    by_type = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, SCOPES["module type Linear None"][0](X86InductorQuantizer(), static()), model)
    # flatten still runs on uint8 for its quantizable user (as in torchao); the linear stays float: float weight
    assert dequantized_inputs(by_type) == {"conv2d": True, "conv2d_1": True, "max_pool2d": True, "flatten": True, "linear": True}
    linear = next(n for n in by_type.graph.nodes if n.name == "linear")
    assert linear.args[1].op == "get_attr"
    by_name = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, SCOPES["module name block None"][0](X86InductorQuantizer(), static()), model)
    assert dequantized_inputs(by_name) == {"conv2d": True, "conv2d_1": False, "max_pool2d": False, "flatten": False, "linear": True}
    # the max_pool2d kept float is claimed: flatten does not look through it to the conv's output
    no_pool = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, SCOPES["function type max_pool2d None"][0](X86InductorQuantizer(), static()), model)
    assert dequantized_inputs(no_pool) == {"conv2d": True, "conv2d_1": True, "max_pool2d": False, "flatten": False, "linear": True}
    pool = next(n for n in qcore.prepare_pt2e(torch.export.export(model, EXAMPLE).module(), SCOPES["function type max_pool2d None"][0](X86InductorQuantizer(), static())).graph.nodes if n.name == "max_pool2d")
    assert "scope has config None" in pool.meta["qcore_kept_float"]


@pytest.mark.torchao
@pytest.mark.parametrize("scope", list(SCOPES))
def test_each_scope_matches_torchaos_x86_inductor_quantizer(scope):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import quantize_pt2e as ao
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    setup, _ = SCOPES[scope]
    torch.manual_seed(0)
    model = ConvBlockPoolLinear().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = convert_with(
            ao.prepare_pt2e, ao.convert_pt2e,
            setup(ao_x86.X86InductorQuantizer(), ao_x86.get_default_x86_inductor_quantization_config()), model,
        )
    ours = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, setup(X86InductorQuantizer(), static()), model)
    assert qdq_counts(ours) == qdq_counts(theirs)
    assert dequantized_inputs(ours) == dequantized_inputs(theirs)
    with torch.no_grad():
        reference = model(*EXAMPLE)
        assert abs(sqnr_db(reference, ours(*EXAMPLE)) - sqnr_db(reference, theirs(*EXAMPLE))) < 0.5


def test_mixing_qat_and_ptq_configs_is_skipped_with_torchaos_warning():
    quantizer = X86InductorQuantizer().set_global(static())
    with pytest.warns(UserWarning, match="Mixed QAT and Non-QAT quantization config is not supported"):
        quantizer.set_module_name_qconfig("block", static(is_qat=True))
    assert "block" not in quantizer.module_name_config
    with pytest.warns(UserWarning, match="Skip the global quantization config"), pytest.warns(UserWarning, match="Mixed QAT and Non-QAT"):
        quantizer.set_global(static(is_qat=True))
    assert not quantizer.global_config.is_qat


def test_mixing_static_and_dynamic_configs_is_skipped_with_torchaos_warning():
    quantizer = X86InductorQuantizer().set_global(static())
    with pytest.warns(UserWarning, match="Mixed dynamic and static quantization config is not supported"):
        quantizer.set_function_type_qconfig(F.linear, dynamic())
    assert quantizer.operator_type_config == {}


def test_dynamic_scopes_alone_quantize_only_the_linears():
    quantizer = X86InductorQuantizer().set_module_type_qconfig(nn.Linear, dynamic())
    converted = convert_with(qcore.prepare_pt2e, qcore.convert_pt2e, quantizer, ConvBlockPoolLinear().eval())
    counts = op_counts(converted)
    assert counts.get("choose_qparams", 0) == 1 and counts.get("quantize_per_tensor", 0) == 1  # the linear's input, at run time
    assert counts.get("dequantize_per_channel", 0) == 1


def test_a_type_the_recipe_cannot_configure_is_a_warning_naming_what_it_can():
    quantizer = X86InductorQuantizer()
    with pytest.warns(UserWarning, match=r"module: unable to customize the quantization config for .*GELU.*it configures: .*Linear"):
        quantizer.set_module_type_qconfig(nn.GELU, static())
    with pytest.warns(UserWarning, match=r"function: unable to customize .*softmax"):
        quantizer.set_function_type_qconfig(F.softmax, static())
    assert quantizer.operator_type_config == {}


def test_module_and_function_types_name_the_aten_operator_they_configure():
    table = X86InductorQuantizer.MODULE_FUNCTION_TO_OPERATOR
    aten = torch.ops.aten
    assert table[nn.Linear] is table[F.linear] is aten.linear.default
    assert table[nn.Conv2d] is aten.conv2d.default and table[nn.Conv1d] is aten.conv1d.default
    assert table[torch.matmul] is aten.matmul.default and table[torch.mul] is aten.mul.Tensor
    assert X86InductorQuantizer.module_function_to_aten_operator_type is table  # torchao's attribute name


def test_get_global_quantization_config_warns_when_unset():
    with pytest.warns(UserWarning, match="call set_global"):
        assert X86InductorQuantizer().get_global_quantization_config() is None
    config = static()
    assert X86InductorQuantizer().set_global(config).get_global_quantization_config() is config


def test_pattern_outputs_carry_is_output_of_quantized_pattern():
    quantizer = X86InductorQuantizer().set_global(static())
    gm = torch.export.export(ConvBlockPoolLinear().eval(), EXAMPLE).module()
    quantizer.annotate(gm)
    flags = {n.name: n.meta["quantization_annotation"]._is_output_of_quantized_pattern
             for n in gm.graph.nodes if "quantization_annotation" in n.meta}
    assert flags["relu"] is True and flags["conv2d"] is True and flags["linear"] is True  # the fused patterns' last nodes
    assert flags["conv2d_1"] is False  # inside conv -> relu: the relu is the pattern's output
    prepared = qcore.prepare_pt2e(torch.export.export(ConvBlockPoolLinear().eval(), EXAMPLE).module(), X86InductorQuantizer().set_global(static()))
    relu = next(n for n in prepared.graph.nodes if n.name == "relu")
    assert relu.meta["quantization_annotation"]._is_output_of_quantized_pattern  # kept through prepare's copy


class GatedConvs(nn.Module):
    """Two convs of one input multiplied (a gate), then a conv of the product."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * torch.sigmoid(self.b(x)))


class ScaledConv(nn.Module):
    """A mul by a broadcast scale (squeeze-excite) and by a scalar: not the recipe's mul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        scale = torch.sigmoid(self.fc(y.mean((2, 3)))).view(1, 8, 1, 1)
        return (y * scale) * 0.5


GATE_EXAMPLE = (torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(2)),)


def _convert(model: nn.Module, quantizer, example=GATE_EXAMPLE, prepare=qcore.prepare_pt2e, convert=qcore.convert_pt2e):
    prepared = prepare(torch.export.export(model, example).module(), quantizer)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        prepared(torch.randn(example[0].shape, generator=generator))
    return convert(prepared)


def test_a_binary_mul_of_two_activations_gets_both_inputs_quantized():
    converted = _convert(GatedConvs().eval(), X86InductorQuantizer().set_global(static()))
    mul = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert all("dequantize_per_tensor" in str(arg.target) for arg in mul.args)
    (user,) = mul.users
    assert op_name(user.target) == "quantize_per_tensor"  # the product is quantized by its consumer, the out conv
    assert op_counts(converted)["quantize_per_tensor"] == 4  # x (shared by both convs), the two mul inputs, the out conv's input


def test_a_mul_by_a_broadcast_scale_or_a_scalar_is_not_quantized():
    converted = _convert(ScaledConv().eval(), X86InductorQuantizer().set_global(static()))
    for mul in (n for n in converted.graph.nodes if n.target is torch.ops.aten.mul.Tensor):
        assert not any("dequantize" in str(getattr(arg, "target", "")) for arg in mul.args), mul.format_node()


def test_function_type_mul_none_keeps_the_gate_float():
    quantizer = X86InductorQuantizer().set_global(static()).set_function_type_qconfig(torch.mul, None)
    converted = _convert(GatedConvs().eval(), quantizer)
    mul = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    assert not any("dequantize" in str(arg.target) for arg in mul.args)


def test_the_lowered_gate_matches_the_qdq_program():
    torch.manual_seed(0)
    model = GatedConvs().eval()
    converted = _convert(model, X86InductorQuantizer().set_global(X86InductorQuantizer.default_config()))
    lowered = qcore.lower(converted, backend="onednn", example_inputs=GATE_EXAMPLE)
    with torch.no_grad():
        expected, actual = converted(*GATE_EXAMPLE), lowered(*GATE_EXAMPLE)
    step = max(float(n.args[1]) for n in converted.graph.nodes if n.op == "call_function" and op_name(n.target) == "quantize_per_tensor")
    assert (expected - actual).abs().max() <= step * 8 * 2  # about one step of the out conv's input per channel sum
    assert sqnr_db(expected, actual) > 30


@pytest.mark.torchao
@pytest.mark.parametrize("model_class", [GatedConvs, ScaledConv])
def test_mul_recipe_matches_torchao(model_class):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import quantize_pt2e as ao
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    torch.manual_seed(0)
    model = model_class().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _convert(model, ao_x86.X86InductorQuantizer().set_global(ao_x86.get_default_x86_inductor_quantization_config()),
                          prepare=ao.prepare_pt2e, convert=ao.convert_pt2e)
    ours = _convert(model, X86InductorQuantizer().set_global(static()))
    assert qdq_counts(ours) == qdq_counts(theirs)


class CatTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(16, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(torch.cat([y, y], 1))


class CatSingle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.conv(x)], 1))


@pytest.mark.parametrize("model_class", [CatTwice, CatSingle])
def test_cat_of_one_input_twice_or_alone_runs_on_uint8_with_one_shared_observer(model_class):
    converted = _convert(model_class().eval(), X86InductorQuantizer().set_global(static()))
    assert qdq_counts(converted) == (3, 2)  # x, the cat's input, the cat's output (shared qparams)
    cat = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.cat.default)
    (quantize,) = cat.users
    dequantizes = {arg for arg in cat.args[0]}
    assert all(op_name(d.target) == "dequantize_per_tensor" for d in dequantizes)
    assert all(d.args[1:3] == quantize.args[1:3] for d in dequantizes)  # input and output: one scale and zero point


@pytest.mark.torchao
@pytest.mark.parametrize("model_class", [CatTwice, CatSingle])
def test_cat_cases_match_torchao(model_class):
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import quantize_pt2e as ao
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    model = model_class().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _convert(model, ao_x86.X86InductorQuantizer().set_global(ao_x86.get_default_x86_inductor_quantization_config()),
                          prepare=ao.prepare_pt2e, convert=ao.convert_pt2e)
    assert qdq_counts(_convert(model, X86InductorQuantizer().set_global(static()))) == qdq_counts(theirs)
