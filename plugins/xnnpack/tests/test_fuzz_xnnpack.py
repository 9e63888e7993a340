"""Random graphs (qcore.testing.random_graphs) through the xnnpack backend: per-channel PTQ and QAT.

Properties, on every drawn graph: prepare / calibrate (or train) / convert never raise; the
user's model is bit-equal afterwards (state_dict, parameters, modes); the converted output is
finite and close to the float model's (SQNR above ``MIN_SQNR_DB``; QAT: the converted program
matches the fake-quantized one); the same seed gives the same program (op counts and outputs
identical, from a second build, export and quantization); save -> load gives identical outputs.
QAT bugs the fuzzer found and that are not fixed yet are ``KNOWN_QAT_BUGS`` (each pinned by a
strict xfail regression test); any other failure fails.

Differential (marked torchao; runs in the fuzz profile or with ``QCORE_FUZZ_DIFFERENTIAL=1``,
since some divergences are not triaged yet): the quantized edges of qcore's program against
those of torchao's XNNPACKQuantizer (torchao.testing.pt2e._xnnpack_quantizer) on the same
graph, as structure; the known kinds of difference are ``KNOWN_XNNPACK_DIFFERENCES``, any other
fails, printing the first differing edge.

``QCORE_FUZZ_PROFILE=fuzz`` runs thousands of examples (``--hypothesis-seed=N`` replays a run).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import event, given, note

import qcore
from qcore.metrics import sqnr_db
from qcore.testing.graph_ops import op_counts
from qcore.testing.random_graphs import (
    KnownDifference,
    RandomGraph,
    assert_state_unchanged,
    edge_differences,
    explain_differences,
    fuzz_settings,
    random_graphs,
    snapshot_state,
)
from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

#: converted vs float model on the example inputs. Not 10 dB: a LayerNorm over a few features
#: amplifies the int8 error of its input (9.0 dB measured: two shared Linear+ReLU blocks then
#: LayerNorm(4, elementwise_affine=False)); a broken program scores about 0 dB or below
MIN_SQNR_DB = 6.0
#: QAT: converted vs the fake-quantized program it came from
MIN_QAT_CONVERT_SQNR_DB = 20.0


def _bucket(sqnr: float) -> str:
    """A 10 dB bucket of an SQNR, for ``--hypothesis-show-statistics``."""
    return "exact" if sqnr == float("inf") else f"{min(int(sqnr // 10) * 10, 60)}+ dB" if sqnr >= 0 else "< 0 dB"


def _run(model: torch.nn.Module, graph: RandomGraph, inputs: tuple = None) -> torch.Tensor:
    with torch.no_grad():
        return model(*(inputs or graph.example_inputs))


def _ptq_by_hand(graph: RandomGraph) -> torch.fx.GraphModule:
    """A second build, export and PTQ of the same graph, with the flow's verbs."""
    model = graph.build()
    snapshot = snapshot_state(model)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = qcore.prepare_pt2e(graph.export(model), quantizer)
    with torch.no_grad():
        for batch in graph.calibration:
            prepared(*batch)
    converted = qcore.convert_pt2e(prepared)
    assert_state_unchanged(model, snapshot)
    return converted


def _assert_same_program(a: torch.fx.GraphModule, b: torch.fx.GraphModule, graph: RandomGraph) -> None:
    assert op_counts(a) == op_counts(b), (op_counts(a), op_counts(b))
    assert torch.equal(_run(a, graph), _run(b, graph))


def _assert_save_load_identical(result, graph: RandomGraph) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.pt2")
        result.save(path)
        loaded = qcore.load(path)
    assert loaded.meta["qcore_backend"] == "xnnpack"
    for batch in graph.calibration[:2]:  # other batch sizes too when the batch is dynamic
        assert torch.equal(_run(loaded, graph, batch), _run(result.converted, graph, batch))


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max_examples=12)
@given(graph=random_graphs())
def test_xnnpack_per_channel_ptq_properties(graph):
    note(graph.to_source())
    model = graph.build()
    snapshot = snapshot_state(model)
    result = qcore.quantize(model, graph.example_inputs, backend="xnnpack", calibration=graph.calibration,
                            dynamic_shapes=graph.dynamic_shapes, measure_latency=False)
    assert_state_unchanged(model, snapshot)
    reference, actual = _run(model, graph), _run(result.converted, graph)
    assert torch.isfinite(actual).all()
    sqnr = sqnr_db(reference, actual)
    note(f"SQNR {sqnr:.1f} dB")
    event(f"SQNR vs float: {_bucket(sqnr)}")
    assert sqnr > MIN_SQNR_DB, f"converted vs float: {sqnr:.1f} dB"

    _assert_same_program(result.converted, _ptq_by_hand(graph), graph)
    _assert_save_load_identical(result, graph)


def _distill(graph: RandomGraph, model: torch.nn.Module):
    """A train_fn: two SGD steps pulling the prepared model towards the float model's outputs."""
    targets = [_run(model, graph, batch) for batch in graph.calibration[:2]]

    def train(prepared: torch.fx.GraphModule) -> None:
        parameters = [p for p in prepared.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=1e-3) if parameters else None
        for batch, target in zip(graph.calibration[:2], targets):
            loss = (prepared(*batch) - target).pow(2).mean()  # observes the batch: also without parameters
            if optimizer is not None and loss.requires_grad:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    return train


def _qat_by_hand(graph: RandomGraph) -> tuple:
    """(fake-quantized output, converted program) of prepare_qat_pt2e + two training steps."""
    model = graph.build()
    snapshot = snapshot_state(model)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))
    prepared = qcore.prepare_qat_pt2e(graph.export(model, training=True), quantizer)
    qcore.move_exported_model_to_train(prepared)
    _distill(graph, model)(prepared)
    qcore.move_exported_model_to_eval(prepared)
    fake_quantized = _run(copy.deepcopy(prepared), graph)  # a copy: running it still moves the observers' ranges
    converted = qcore.convert_pt2e(prepared)
    assert_state_unchanged(model, snapshot)
    return fake_quantized, converted


#: Bugs the fuzzer found that are not fixed yet: name -> (what, does this failure match it).
#: Each has a strict xfail regression test below; remove the entry when that test passes.
KNOWN_QAT_BUGS: dict = {}  # (QAT of conv_transpose2d, axis-1 fake-quant: fixed, test below)


def _known_qat_bug(graph: RandomGraph, exc: BaseException) -> "str | None":
    return next((name for name, (_, matches) in KNOWN_QAT_BUGS.items() if matches(graph, exc)), None)


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max_examples=8)
@given(graph=random_graphs())
def test_xnnpack_qat_properties(graph):
    note(graph.to_source())
    try:
        _check_qat_properties(graph)
    except Exception as exc:
        bug = _known_qat_bug(graph, exc)
        if bug is None:
            raise
        event(f"known bug: {bug}")  # pinned by its xfail regression test; every other failure fails


def _check_qat_properties(graph: RandomGraph) -> None:
    model = graph.build()
    snapshot = snapshot_state(model)
    result = qcore.quantize(model, graph.example_inputs, backend="xnnpack", qat=True, train_fn=_distill(graph, model),
                            dynamic_shapes=graph.dynamic_shapes, measure_latency=False)
    assert_state_unchanged(model, snapshot)  # QAT trains a copy
    actual = _run(result.converted, graph)
    assert torch.isfinite(actual).all()

    fake_quantized, converted = _qat_by_hand(graph)
    sqnr = sqnr_db(fake_quantized, _run(converted, graph))
    note(f"converted vs fake-quantized: {sqnr:.1f} dB; vs float: {sqnr_db(_run(model, graph), actual):.1f} dB")
    assert sqnr > MIN_QAT_CONVERT_SQNR_DB, f"converted vs fake-quantized: {sqnr:.1f} dB"
    _assert_same_program(result.converted, converted, graph)
    _assert_save_load_identical(result, graph)


# --------------------------------------------------------------------------- regressions the fuzzer found
class _SharedConvBnTwice(torch.nn.Module):
    """Shrunk from a fuzzed graph: one Conv2d + BatchNorm2d + ReLU submodule called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x))


def _train_once(example: tuple):
    def train(prepared: torch.fx.GraphModule) -> None:
        prepared(*example)

    return train


def test_qat_leaves_a_shared_batch_norm_of_the_users_model_unchanged():
    torch.manual_seed(0)
    model = _SharedConvBnTwice().eval()
    example = (torch.randn(2, 3, 6, 6),)
    snapshot = snapshot_state(model)
    qcore.quantize(model, example, backend="xnnpack", qat=True, train_fn=_train_once(example), measure_latency=False)
    assert_state_unchanged(model, snapshot)


def test_qat_of_conv_transpose2d():
    """Found by the fuzzer: the weight's per-channel fake-quantizer runs on axis 1, which torch's
    fused moving-average kernel refuses; qcore takes the unfused path there."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(2, 3, 3, padding=1)).eval()
    example = (torch.randn(2, 2, 4, 4),)
    result = qcore.quantize(model, example, backend="xnnpack", qat=True, train_fn=_train_once(example), measure_latency=False)
    out = result.converted(*example)
    assert torch.isfinite(out).all()
    weight_dq = [n for n in result.converted.graph.nodes
                 if n.op == "call_function" and n.target is torch.ops.quantized_decomposed.dequantize_per_channel.default]
    assert len(weight_dq) == 1 and weight_dq[0].args[3] == 1  # output channels of a transposed conv: axis 1
    assert sqnr_db(model(*example), out) > 25


# --------------------------------------------------------------------------- differential: torchao
def _torchao_program(graph: RandomGraph) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer as TorchaoXNNPACKQuantizer
    from torchao.testing.pt2e._xnnpack_quantizer import get_symmetric_quantization_config as torchao_config

    quantizer = TorchaoXNNPACKQuantizer().set_global(torchao_config(is_per_channel=True))
    prepared = prepare_pt2e(graph.export(), quantizer)
    with torch.no_grad():
        for batch in graph.calibration:
            prepared(*batch)
    return convert_pt2e(prepared)


def _qcore_program(graph: RandomGraph) -> torch.fx.GraphModule:
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = qcore.prepare_pt2e(graph.export(), quantizer)
    with torch.no_grad():
        for batch in graph.calibration:
            prepared(*batch)
    return qcore.convert_pt2e(prepared)




# The first program is qcore's, the second torchao's. Each entry: a kind of difference expected
# on torch 2.13 (not a bug to fix here), what it matches, and why.
def _touches(difference, *ops: str) -> bool:
    return difference.edge.consumer_op in ops or difference.edge.producer_op in ops


def _bn_folded_by_torchao(difference, pair) -> bool:
    """An edge at a batch norm torchao folded away, or at the linear it folded it into."""
    producer, consumer, _ = difference.key
    for name in (producer, consumer):
        if "batch_norm" in pair.op(name) and pair.node("b", name) is None:
            return True
    linear = pair.node("a", producer)
    return (difference.kind == "only_b" and linear is not None and pair.op(producer) == "linear"
            and any("batch_norm" in pair.op(user.name) and pair.node("b", user.name) is None for user in linear.users))


def _is_reused_module_call(node) -> bool:
    """A conv / linear node from a module the graph calls at several sites (same innermost module, same op)."""
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack or node.op != "call_function":
        return False
    fqn = list(stack.values())[-1][0]
    return any(other is not node and other.op == "call_function" and other.target == node.target
               and list((other.meta.get("nn_module_stack") or {"": ("", None)}).values())[-1][0] == fqn
               for other in node.graph.nodes)


def _at_reused_module_call(difference, pair) -> bool:
    producer, consumer, _ = difference.key
    return difference.kind == "only_a" and any(
        pair.op(name) in ("conv1d", "conv2d", "linear") and _is_reused_module_call(pair.node("a", name))
        for name in (producer, consumer))


#: ops whose output torchao's xnnpack annotators quantize
PATTERN_OUTPUTS = ("linear", "conv1d", "conv2d", "relu", "hardtanh", "add", "mul")


KNOWN_XNNPACK_DIFFERENCES = [
    KnownDifference("mul_inputs", "torchao quantizes both inputs of a binary mul; qcore does not",
                    lambda d, pair: d.kind == "only_b" and d.edge.consumer_op == "mul"),
    KnownDifference("conv1d", "qcore quantizes conv1d inputs; torchao leaves them float",
                    lambda d, pair: d.kind == "only_a" and _touches(d, "conv1d")),
    KnownDifference("activation_matmul", "qcore quantizes activation matmuls; torchao leaves them float",
                    lambda d, pair: d.kind == "only_a" and _touches(d, "matmul")),
    KnownDifference("linear_bn1d_fold", "torchao folds linear + BatchNorm1d (the batch norm is gone from its program); "
                    "qcore keeps the batch norm", _bn_folded_by_torchao),
    KnownDifference("source_partitions", "torchao's cat and adaptive_avg_pool2d annotators use source partitions, which "
                    "find nothing on torch 2.13 for functional calls (no source_fn_stack): torchao leaves them float, "
                    "qcore quantizes them sharing their input's qparams",
                    lambda d, pair: d.kind == "only_a" and _touches(d, "cat", "adaptive_avg_pool2d")),
    KnownDifference("conv_transpose", "found by the fuzzer: qcore quantizes conv_transpose2d (README: xnnpack patterns); "
                    "torchao's XNNPACK test quantizer has no conv_transpose annotator",
                    lambda d, pair: d.kind == "only_a" and _touches(d, "conv_transpose2d")),
    KnownDifference("float_consumer_outputs", "found by the fuzzer: torchao quantizes the output of every annotated "
                    "linear / conv / relu / hardtanh, also where only float ops (layer_norm, sigmoid, matmul, the graph "
                    "output, ...) read it; qcore quantizes an output only where a consumer reads it quantized",
                    lambda d, pair: d.kind == "only_b" and d.edge.producer_op in PATTERN_OUTPUTS
                    and pair.quantized_inputs("a", d.edge.consumer) == 0),
    KnownDifference("shared_module_calls", "found by the fuzzer: a conv / linear module called at several sites "
                    "shares its weight; the peer's annotators ask whether any node of a partition (the shared weight "
                    "included) is annotated, so they skip every call after the first, and that call reads an int8 "
                    "input with a float weight (its .pte fails to load: 'Failed to create convolution node'); qcore "
                    "quantizes every call", _at_reused_module_call),
]


def _differential_enabled() -> bool:
    from qcore.testing.random_graphs import selected_profile

    return selected_profile() == "fuzz" or os.environ.get("QCORE_FUZZ_DIFFERENTIAL", "") not in ("", "0")


def _torchao_or_skip(graph: RandomGraph):
    """torchao's program, or None (an event, not a failure) when torchao itself raises on the graph."""
    try:
        return _torchao_program(graph)
    except Exception as exc:  # a torchao bug: nothing to compare
        event(f"torchao raised {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        note(f"torchao raised {type(exc).__name__}: {exc}")
        return None


@pytest.mark.torchao
@pytest.mark.skipif(not _differential_enabled(), reason="differential fuzzing runs in the fuzz profile "
                    "(QCORE_FUZZ_PROFILE=fuzz) or with QCORE_FUZZ_DIFFERENTIAL=1: some divergences are not yet triaged")
@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max_examples=10)
@given(graph=random_graphs())
def test_xnnpack_quantized_edges_match_torchaos(graph):
    pytest.importorskip("torchao.testing.pt2e._xnnpack_quantizer")
    note(graph.to_source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _qcore_program(graph), _torchao_or_skip(graph)
    if theirs is None:
        return
    explained = explain_differences(edge_differences(ours, theirs), KNOWN_XNNPACK_DIFFERENCES, ours, theirs)
    for difference, why in explained:
        note(f"{difference}: {why or 'UNEXPLAINED'}")
        if why is not None:
            event(f"known: {why.split(' (')[0]}")
    left = [d for d, why in explained if why is None]
    assert not left, f"first unexplained difference (first = qcore, second = torchao): {left[0]}"


# --------------------------------------------------------------------------- differential: ExecuTorch
def _executorch_program(graph: RandomGraph) -> torch.fx.GraphModule:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer as ExecuTorchXNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config as executorch_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(graph.export(), ExecuTorchXNNPACKQuantizer().set_global(executorch_config(is_per_channel=True)))
    with torch.no_grad():
        for batch in graph.calibration:
            prepared(*batch)
    return convert_pt2e(prepared)


def _known(name: str) -> KnownDifference:
    return next(k for k in KNOWN_XNNPACK_DIFFERENCES if k.name == name)


#: ExecuTorch 1.5.1's quantizer is the production peer; qcore follows its sharing list and conv
#: ranks (test_xnnpack_executorch_parity.py), so what is left is of kind b (source partitions find
#: nothing on torch 2.13), kind c (qcore skips a q/dq nothing quantized reads) or issue 19's
#: linear + BatchNorm1d folding
KNOWN_EXECUTORCH_DIFFERENCES = [_known("source_partitions"), _known("float_consumer_outputs"), _known("linear_bn1d_fold"),
                                _known("shared_module_calls")]


@pytest.mark.executorch
@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max_examples=12)
@given(graph=random_graphs())
def test_xnnpack_quantized_edges_match_executorchs(graph):
    pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", exc_type=ImportError)
    note(graph.to_source())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _qcore_program(graph), _executorch_program(graph)
    explained = explain_differences(edge_differences(ours, theirs), KNOWN_EXECUTORCH_DIFFERENCES, ours, theirs)
    for difference, why in explained:
        note(f"{difference}: {why or 'UNEXPLAINED'}")
        if why is not None:
            event(f"known: {why.split(' (')[0]}")
    left = [d for d, why in explained if why is None]
    assert not left, f"first unexplained difference (first = qcore, second = ExecuTorch): {left[0]}"
