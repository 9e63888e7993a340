"""The default x86 sharing recipe, torchao's "int8-in-int8-out": max_pool2d, cat, avg_pool2d,
adaptive_avg_pool2d and flatten after a quantized pattern get ``dq -> op -> q`` with one observer
on both sides; the lowering runs them on uint8 (average pools through qcore's uint8 pools)."""

from __future__ import annotations

import copy
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcore
from qcore.annotation import ANNOTATION_KEY, kept_float_reason
from qcore.records import LoweringContext

from _onednn_helpers import QDQ_OPS, aten, calls, count, counters, export, largest_activation_scale, lower, qd, qdq_count

from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
from qcore_onednn_x86.annotators import CONV1D_CONV3D_ANNOTATORS, SHARING_RECIPES
from qcore_onednn_x86.annotators.int8_in_int8_out import FLATTEN_CONSUMER_REASON, NOT_QUANTIZED_INPUT_REASON
from qcore_onednn_x86.lowering.avg_pool2d_uint8_ops import adaptive_avg_pool2d_uint8, avg_pool2d_uint8
from qcore_onednn_x86.lowering.lower_quantized_avg_pool2d import lower_quantized_avg_pool2d

Q, DQ, DQ_CH = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default
POOL_OPS = (aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default)


# ----------------------------------------------------------------------------- models
class ConvOp(nn.Module):
    """conv -> op -> tail ("conv": a 1x1 conv; "linear"; "flatten_linear"; "none": the op's output is the model's)."""

    def __init__(self, op, tail: str = "conv", kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)
        self.op, self.tail = op, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(self.conv(x))
        if self.tail == "conv":
            return self.conv2(y)
        if self.tail == "linear":
            return self.fc(y)
        if self.tail == "flatten_linear":
            return self.fc(torch.flatten(y, 1))
        return y


class ConvCat(nn.Module):
    """cat of two convs ("two"), of one conv twice ("same"), or of one conv alone ("one")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        if self.kind == "two":
            return torch.cat([a, self.b(x)], 1)
        if self.kind == "same":
            return torch.cat([a, a], 1)
        return torch.cat([a], 1)


class ConvReluPoolFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def _adaptive_then_flatten(y: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)


#: name -> (model factory, input shape, op, expected (quantize, dequantize, dequantize_per_channel)
#: after convert: torchao's counts on the same model); walking q/dq pairs from the input:
#: x, then one pair per int8-in-int8-out edge, then one for each further consumer
CASES = {
    # x | conv -> max_pool2d | max_pool2d -> conv2
    "max_pool2d": (lambda: ConvOp(lambda y: F.max_pool2d(y, 2)), (2, 3, 8, 8), aten.max_pool2d.default, (3, 3, 2)),
    "avg_pool2d": (lambda: ConvOp(lambda y: F.avg_pool2d(y, 3, 2, 1)), (2, 3, 8, 8), aten.avg_pool2d.default, (3, 3, 2)),
    # the pool's output is the model's: still quantized (shared), then dequantized for the caller
    "avg_pool2d_output": (lambda: ConvOp(lambda y: F.avg_pool2d(y, 2), "none"), (2, 3, 8, 8), aten.avg_pool2d.default, (3, 3, 1)),
    # x | conv -> adaptive_avg_pool2d | pool -> flatten | flatten -> linear
    "adaptive_avg_pool2d": (lambda: ConvOp(_adaptive_then_flatten, "linear"), (2, 3, 8, 8), aten.adaptive_avg_pool2d.default, (4, 4, 2)),
    "flatten": (lambda: ConvOp(lambda y: y, "flatten_linear", kernel=1), (2, 3, 1, 1), aten.flatten.using_ints, (3, 3, 2)),
    # x (read by two convs: two dequantizes) | a -> cat | b -> cat | cat output
    "cat": (lambda: ConvCat("two"), (2, 3, 8, 8), aten.cat.default, (4, 5, 2)),
    "cat_same_input_twice": (lambda: ConvCat("same"), (2, 3, 8, 8), aten.cat.default, (3, 3, 1)),
    "cat_single_input": (lambda: ConvCat("one"), (2, 3, 8, 8), aten.cat.default, (3, 3, 1)),
    # x | relu -> max_pool2d | max_pool2d -> flatten | flatten -> linear
    "conv_max_pool2d_flatten_linear": (ConvReluPoolFlattenLinear, (2, 3, 8, 8), aten.max_pool2d.default, (4, 4, 2)),
}


def quantizer(recipe: str = "torchao") -> X86InductorQuantizer:
    # torchao's ranges ([0, 255] x [-128, 127]) whatever this CPU is, for the parity tests
    return X86InductorQuantizer(sharing_recipe=recipe).set_global(get_default_x86_inductor_quantization_config(target="avx512_vnni"))


def example_of(name: str) -> tuple:
    torch.manual_seed(0)
    return (torch.randn(CASES[name][1]),)


def prepared_of(name: str, q: X86InductorQuantizer | None = None) -> tuple:
    factory = CASES[name][0]
    torch.manual_seed(0)
    model = factory().eval()
    example = example_of(name)
    prepared = qcore.prepare_pt2e(export(copy.deepcopy(model), example), q or quantizer())
    return model, example, prepared


def calibrated(prepared: torch.fx.GraphModule, example: tuple) -> torch.fx.GraphModule:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(example[0].shape, generator=g))
        prepared(*example)
    return prepared


def converted_of(name: str, q: X86InductorQuantizer | None = None) -> tuple:
    model, example, prepared = prepared_of(name, q)
    return model, example, qcore.convert_pt2e(calibrated(prepared, example))


def qdq_counts(gm: torch.fx.GraphModule) -> tuple:
    return count(gm, Q), count(gm, DQ), count(gm, DQ_CH)


def op_inputs(node: torch.fx.Node) -> list:
    return list(node.args[0]) if node.target is aten.cat.default else [node.args[0]]


# ----------------------------------------------------------------------------- annotation
@pytest.mark.parametrize("name", list(CASES))
def test_q_dq_counts_and_node_order_around_the_op(name):
    _, _, converted = converted_of(name)
    op = CASES[name][2]
    assert qdq_counts(converted) == CASES[name][3]
    for node in calls(converted, op):
        # q -> dq -> op -> q -> dq, one scale and zero point on every edge
        (quant,) = node.users
        assert quant.target is Q and all(user.target is DQ for user in quant.users)
        for arg in op_inputs(node):
            assert arg.target is DQ and arg.args[0].target is Q, arg.name
            assert arg.args[1:] == quant.args[1:], (arg.args, quant.args)


def test_chain_conv_max_pool2d_flatten_linear_in_graph_order():
    _, _, converted = converted_of("conv_max_pool2d_flatten_linear")
    ops = [n.target for n in converted.graph.nodes if n.op == "call_function" and n.target is not DQ_CH]
    assert ops == [
        Q, DQ, aten.conv2d.default, aten.relu.default,
        Q, DQ, aten.max_pool2d.default,
        Q, DQ, aten.flatten.using_ints,
        Q, DQ, aten.linear.default,
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_one_observer_instance_on_both_sides_of_the_op(name):
    _, _, prepared = prepared_of(name)
    (node,) = calls(prepared, CASES[name][2])
    before = {id(getattr(prepared, arg.target)) for arg in op_inputs(node)}
    (after,) = node.users
    assert len(before) == 1 and id(getattr(prepared, after.target)) in before
    conv = calls(prepared, aten.conv2d.default)[0]
    assert getattr(prepared, conv.args[0].target) is not getattr(prepared, after.target)


def test_one_observer_instance_along_the_whole_chain():
    _, _, prepared = prepared_of("conv_max_pool2d_flatten_linear")
    pool, flatten, linear = (calls(prepared, op)[0] for op in (aten.max_pool2d.default, aten.flatten.using_ints, aten.linear.default))
    observers = {id(getattr(prepared, n.target)) for n in (pool.args[0], flatten.args[0], linear.args[0])}
    assert len(observers) == 1


def test_annotations_carry_torchaos_flags():
    gm = export(ConvReluPoolFlattenLinear().eval(), (torch.randn(2, 3, 8, 8),))
    quantizer().annotate(gm)
    pool = calls(gm, aten.max_pool2d.default)[0]
    annotation = pool.meta[ANNOTATION_KEY]
    assert annotation._annotated and annotation._is_output_of_quantized_pattern
    assert annotation.input_qspec_map[pool.args[0]] == get_default_x86_inductor_quantization_config(target="avx512_vnni").input_activation
    assert annotation.output_qspec.edge_or_node == (pool.args[0], pool)


def test_cat_shares_the_first_inputs_spec_and_quantizes_a_repeated_input_once():
    gm = export(ConvCat("two").eval(), (torch.randn(2, 3, 8, 8),))
    quantizer().annotate(gm)
    cat = calls(gm, aten.cat.default)[0]
    a, b = cat.args[0]
    annotation = cat.meta[ANNOTATION_KEY]
    assert annotation.input_qspec_map[b].edge_or_node == (a, cat)
    assert annotation.output_qspec.edge_or_node == (a, cat)
    same = export(ConvCat("same").eval(), (torch.randn(2, 3, 8, 8),))
    quantizer().annotate(same)
    cat = calls(same, aten.cat.default)[0]
    assert list(cat.meta[ANNOTATION_KEY].input_qspec_map) == [cat.args[0][0]]


def test_max_pool2d_of_an_unquantized_input_stays_float_with_the_reason():
    class PoolConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(F.max_pool2d(x, 2))

    example = (torch.randn(2, 3, 8, 8),)
    gm = export(PoolConv().eval(), example)
    quantizer().annotate(gm)
    pool = calls(gm, aten.max_pool2d.default)[0]
    assert ANNOTATION_KEY not in pool.meta
    assert kept_float_reason(pool) == NOT_QUANTIZED_INPUT_REASON
    converted = qcore.convert_pt2e(calibrated(qcore.prepare_pt2e(export(PoolConv().eval(), example), quantizer()), example))
    assert qdq_counts(converted) == (1, 1, 1)  # the conv's input only
    pool = calls(converted, aten.max_pool2d.default)[0]
    assert pool.args[0].op == "placeholder" and next(iter(pool.users)).target is Q


def test_flatten_without_a_quantizable_user_stays_float():
    class ConvFlattenT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.flatten(self.conv(x), 1).t()

    example = (torch.randn(2, 3, 8, 8),)
    gm = export(ConvFlattenT().eval(), example)
    quantizer().annotate(gm)
    flatten = calls(gm, aten.flatten.using_ints)[0]
    assert ANNOTATION_KEY not in flatten.meta and kept_float_reason(flatten) == FLATTEN_CONSUMER_REASON
    converted = qcore.convert_pt2e(calibrated(qcore.prepare_pt2e(export(ConvFlattenT().eval(), example), quantizer()), example))
    assert qdq_counts(converted) == (1, 1, 1)


NONE_SCOPES = pytest.mark.parametrize(
    "name, configure, counts",
    [
        # x, and the consumer conv's own input after the float pool
        ("avg_pool2d", lambda q: q.set_function_type_qconfig(F.avg_pool2d, None), (2, 2, 2)),
        ("max_pool2d", lambda q: q.set_module_type_qconfig(nn.MaxPool2d, None), (2, 2, 2)),
        # x only (read by both convs); the float cat is the model's output
        ("cat", lambda q: q.set_function_type_qconfig(torch.cat, None), (1, 2, 2)),
        # flatten does not see past the float pool: only the linear's input is quantized after it
        ("conv_max_pool2d_flatten_linear", lambda q: q.set_module_name_qconfig("pool", None), (2, 2, 2)),
    ],
)


@NONE_SCOPES
def test_a_none_scope_keeps_the_op_float(name, configure, counts):
    _, _, converted = converted_of(name, configure(quantizer()))
    (node,) = calls(converted, CASES[name][2])
    assert all(arg.target not in QDQ_OPS for arg in op_inputs(node)), node.args
    assert qdq_counts(converted) == counts
    if name == "conv_max_pool2d_flatten_linear":
        flatten = calls(converted, aten.flatten.using_ints)[0]
        assert flatten.args[0] is node and next(iter(flatten.users)).target is Q


class ConvBnReluPoolsFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return torch.flatten(self.pool(F.max_pool2d(self.relu(self.bn(self.conv(x))), 2)), 1)


def _qat_converted(flow: str) -> tuple:
    torch.manual_seed(0)
    model, example = ConvBnReluPoolsFlatten().train(), (torch.randn(2, 3, 8, 8),)
    exported = torch.export.export(copy.deepcopy(model), example).module()
    if flow == "qcore":
        config = get_default_x86_inductor_quantization_config(is_qat=True, target="avx512_vnni")
        prepared = qcore.prepare_qat_pt2e(exported, X86InductorQuantizer().set_global(config))
        prepared(*example)
        qcore.move_exported_model_to_eval(prepared)
        return example, qcore.convert_pt2e(prepared)
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(exported, quantizer)
    prepared(*example)
    move_exported_model_to_eval(prepared)
    return example, convert_pt2e(prepared)


def test_qat_conv_bn_relu_partition_feeds_the_pools():
    # the QAT partition quantizes its own output: the pools' edges share that fake-quantizer's
    # qparams (one q/dq per edge); the flatten is the model's output, so it stays float
    _, converted = _qat_converted("qcore")
    ops = [n.target for n in converted.graph.nodes if n.op == "call_function" and n.target is not DQ_CH]
    assert ops == [
        Q, DQ, aten.conv2d.default, aten.relu.default,
        Q, DQ, aten.max_pool2d.default,
        Q, DQ, aten.adaptive_avg_pool2d.default,
        Q, DQ, aten.flatten.using_ints,
    ]
    scales = {n.args[1:3] for n in calls(converted, Q)[1:]}
    assert len(scales) == 1


# ----------------------------------------------------------------------------- the recipes
def test_sharing_recipe_is_checked_and_selects_its_annotators():
    with pytest.raises(ValueError, match=r"unknown sharing_recipe 'ipex'; allowed: 'torchao', 'sqnr'"):
        X86InductorQuantizer(sharing_recipe="ipex")
    assert X86InductorQuantizer().sharing_recipe == "torchao"
    every = {a.name for a in qcore.get_plugin_manager().annotators("onednn")}
    for recipe, names in SHARING_RECIPES.items():
        selected = {a.name for a in X86InductorQuantizer(sharing_recipe=recipe).annotators()}
        others = {n for r, ns in SHARING_RECIPES.items() if r != recipe for n in ns}
        assert set(names) <= selected and not (others & selected)
        assert selected | others | set(CONV1D_CONV3D_ANNOTATORS) == every  # everything else runs in both recipes
        opted_in = {a.name for a in X86InductorQuantizer(sharing_recipe=recipe, conv1d_conv3d=True).annotators()}
        assert opted_in == selected | set(CONV1D_CONV3D_ANNOTATORS)  # the conv1d/conv3d opt-in adds only its own


def test_sqnr_recipe_keeps_average_pools_float_and_derives_max_pool2d_qparams():
    _, _, converted = converted_of("adaptive_avg_pool2d", quantizer("sqnr"))
    pool = calls(converted, aten.adaptive_avg_pool2d.default)[0]
    assert pool.args[0].target not in QDQ_OPS and qdq_counts(converted) == (2, 2, 2)
    _, _, prepared = prepared_of("max_pool2d", quantizer("sqnr"))
    pool = calls(prepared, aten.max_pool2d.default)[0]
    assert type(getattr(prepared, pool.args[0].target)).__name__ == "DerivedObserverOrFakeQuantize"


# ----------------------------------------------------------------------------- torchao parity
def _torchao_converted(model, example, configure=lambda q: q):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchao's deprecation notices
        pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        peer_quantizer = configure(xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config()))
        peer = convert_pt2e(calibrated(prepare_pt2e(export(copy.deepcopy(model), example), peer_quantizer), example))
        with torch.no_grad():
            return peer, peer(*example)


@pytest.mark.torchao
@pytest.mark.parametrize("name", list(CASES))
def test_same_q_dq_counts_and_outputs_as_torchao(name):
    model, example, ours = converted_of(name)
    peer, expected = _torchao_converted(model, example)
    assert qdq_counts(ours) == qdq_counts(peer) == CASES[name][3]
    with torch.no_grad():
        diff = (ours(*example) - expected).abs().max().item()
    assert diff <= largest_activation_scale(ours) * 1.01 + 1e-6, diff


@pytest.mark.torchao
@NONE_SCOPES
def test_a_none_scope_gives_torchaos_counts_and_outputs(name, configure, counts):
    model, example, ours = converted_of(name, configure(quantizer()))
    peer, expected = _torchao_converted(model, example, configure)
    assert qdq_counts(ours) == qdq_counts(peer) == counts
    with torch.no_grad():
        assert (ours(*example) - expected).abs().max().item() <= largest_activation_scale(ours) * 1.01 + 1e-6


@pytest.mark.torchao
def test_qat_gives_torchaos_counts_and_node_order():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
        _, peer = _qat_converted("torchao")
    _, ours = _qat_converted("qcore")
    assert qdq_counts(ours) == qdq_counts(peer) == (4, 4, 1)

    def order(gm):
        return [n.target for n in gm.graph.nodes if n.op == "call_function"]

    assert order(ours) == order(peer)


# ----------------------------------------------------------------------------- lowering
def _exact_pool(values: torch.Tensor, zero_point: int, quant_max: int, windows) -> torch.Tensor:
    """The oracle: ``zp + round_half_even(sum(x - zp) / divisor)`` with Fractions, per window."""
    out = []
    for n in range(values.shape[0]):
        for c in range(values.shape[1]):
            for (hs, he, ws, we, divisor) in windows:
                total = sum(int(values[n, c, h, w]) - zero_point for h in range(hs, he) for w in range(ws, we))
                out.append(min(max(round(Fraction(total, divisor)) + zero_point, 0), quant_max))
    return torch.tensor(out, dtype=torch.uint8)


def _avg_pool_windows(h, w, k, s, p, ceil_mode, count_include_pad, divisor_override):
    """aten's avg_pool2d windows (start, end per dim, after clipping) and divisors."""

    def out_size(size):
        n = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
        return n - 1 if ceil_mode and (n - 1) * s >= size + p else n

    windows = []
    for oh in range(out_size(h)):
        for ow in range(out_size(w)):
            hs, ws = oh * s - p, ow * s - p
            he, we = min(hs + k, h + p), min(ws + k, w + p)
            pool_size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            divisor = divisor_override or (pool_size if count_include_pad else (he - hs) * (we - ws))
            windows.append((hs, he, ws, we, divisor))
    return windows


@pytest.mark.parametrize("k, s, p, ceil_mode, count_include_pad, divisor_override", [
    (2, 2, 0, False, True, None),  # ties (sum / 4 = k + 0.5) in a quarter of the windows
    (3, 2, 1, False, True, None),
    (3, 2, 1, True, False, None),
    (3, 1, 1, False, False, None),
    (2, 2, 1, True, True, None),
    (3, 2, 0, True, True, 5),
])
@pytest.mark.parametrize("zero_point, quant_max", [(0, 255), (97, 255), (40, 180)])
def test_uint8_avg_pool2d_is_exact(k, s, p, ceil_mode, count_include_pad, divisor_override, zero_point, quant_max):
    g = torch.Generator().manual_seed(k * 100 + zero_point)
    x = torch.randint(0, quant_max + 1, (2, 3, 7, 9), dtype=torch.uint8, generator=g)
    expected = _exact_pool(x, zero_point, quant_max, _avg_pool_windows(7, 9, k, s, p, ceil_mode, count_include_pad, divisor_override))
    for layout in (torch.contiguous_format, torch.channels_last):
        y = avg_pool2d_uint8(x.contiguous(memory_format=layout), zero_point, 0, quant_max, [k, k], [s, s], [p, p],
                             ceil_mode, count_include_pad, divisor_override)
        assert y.dtype == torch.uint8
        assert torch.equal(y.contiguous().flatten(), expected)


@pytest.mark.parametrize("output_size", [(1, 1), (3, 4), (5, 7), (7, 9)])
def test_uint8_adaptive_avg_pool2d_is_exact(output_size):
    g = torch.Generator().manual_seed(sum(output_size))
    x = torch.randint(0, 256, (2, 3, 7, 9), dtype=torch.uint8, generator=g)
    windows = []
    for oh in range(output_size[0]):
        for ow in range(output_size[1]):
            hs, he = (oh * 7) // output_size[0], -(-((oh + 1) * 7) // output_size[0])
            ws, we = (ow * 9) // output_size[1], -(-((ow + 1) * 9) // output_size[1])
            windows.append((hs, he, ws, we, (he - hs) * (we - ws)))
    expected = _exact_pool(x, 128, 255, windows)
    assert torch.equal(adaptive_avg_pool2d_uint8(x, 128, 0, 255, list(output_size)).flatten(), expected)


POOLS = {
    "avg_pool2d": lambda y: F.avg_pool2d(y, 2),
    "avg_pool2d_padded": lambda y: F.avg_pool2d(y, 3, 2, 1),
    "avg_pool2d_ceil_no_pad_count": lambda y: F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    "avg_pool2d_divisor": lambda y: F.avg_pool2d(y, 3, 1, 1, divisor_override=7),
    "adaptive_avg_pool2d": lambda y: F.adaptive_avg_pool2d(y, (3, 2)),
}


class ConvReluPoolConv(nn.Module):
    def __init__(self, pool) -> None:
        super().__init__()
        self.conv, self.relu, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)
        self.pool = pool

    def forward(self, x):
        return self.conv2(self.pool(self.relu(self.conv(x))))


def _lowered(model, example):
    prepared = calibrated(qcore.prepare_pt2e(export(model, example), X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config())), example)  # this CPU's config
    converted = qcore.convert_pt2e(prepared)
    return converted, lower(converted, example)


def _within_one_step(converted, lowered, example):
    with torch.no_grad():
        reference, actual = converted(*example), lowered(*example)
    diff = (reference - actual).abs().max().item()
    assert diff <= largest_activation_scale(converted) * 1.01 + 1e-5, diff
    return actual


@pytest.mark.parametrize("name", list(POOLS))
def test_average_pool_runs_on_uint8_after_lowering(name):
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 10, 10),)
    converted, lowered = _lowered(ConvReluPoolConv(POOLS[name]).eval(), example)
    op = aten.adaptive_avg_pool2d.default if name.startswith("adaptive") else aten.avg_pool2d.default
    uint8_op = adaptive_avg_pool2d_uint8.default if op is aten.adaptive_avg_pool2d.default else avg_pool2d_uint8.default
    assert count(converted, op) == 1 and qdq_counts(converted) == (3, 3, 2)  # x, pool input, pool output; 2 weights
    (pooled,) = calls(lowered, uint8_op)
    assert count(lowered, op) == 0 and qdq_count(lowered) == 1  # the model input's quantize only
    assert pooled.args[0].target in (torch.ops.onednn.qconv2d_pointwise.default, torch.ops.qcore_onednn.clamp_uint8.default)
    assert next(iter(pooled.users)).target is torch.ops.onednn.qconv2d_pointwise.default
    assert counters(lowered)["qavgpool2d_matcher_count"] == 1
    _within_one_step(converted, lowered, example)


def test_adaptive_pool_flatten_linear_chain_lowers_to_uint8_end_to_end():
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 8, 8),)
    converted, lowered = _lowered(ConvOp(_adaptive_then_flatten, "linear").eval(), example)
    ops = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert ops.count(adaptive_avg_pool2d_uint8.default) == 1 and ops.count(aten.flatten.using_ints) == 1
    assert qdq_count(lowered) == 1 and ops.index(adaptive_avg_pool2d_uint8.default) < ops.index(aten.flatten.using_ints)
    _within_one_step(converted, lowered, example)


def test_average_pool_with_different_qparams_is_left_alone():
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 10, 10),)
    model = ConvReluPoolConv(POOLS["avg_pool2d"]).eval()
    prepared = calibrated(qcore.prepare_pt2e(export(model, example), quantizer()), example)
    converted = qcore.convert_pt2e(prepared)
    pool = calls(converted, aten.avg_pool2d.default)[0]
    quant = next(iter(pool.users))
    quant.args = (quant.args[0], quant.args[1] * 2, *quant.args[2:])
    converted.recompile()
    assert lower_quantized_avg_pool2d(converted, LoweringContext(backend="onednn")) is False
    assert count(converted, aten.avg_pool2d.default) == 1


@pytest.mark.slow
def test_compiled_uint8_average_pools_equal_the_eager_lowered_model():
    """Inductor decomposes the uint8 pools into one fused loop (uint8 in, uint8 out)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    example = (torch.randn(2, 3, 10, 10),)
    model = ConvOp(lambda y: _adaptive_then_flatten(F.avg_pool2d(y, 3, 2, 1, ceil_mode=True, count_include_pad=False)), "linear")
    converted, _ = _lowered(model.eval(), example)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=example, options={"max_autotune": False})
    assert counters(compiled.lowered)["qavgpool2d_matcher_count"] == 2
    eager = _within_one_step(converted, compiled.lowered, example)
    assert torch.equal(compiled(*example), eager)
    torch._dynamo.reset()
