"""Random graphs (qcore.testing.random_graphs) through the XNNPACK recipe down to an ExecuTorch
``.pte``, run on ExecuTorch's runtime (needs executorch; marker ``executorch``).

Properties, on every drawn graph (XNNPACK per-channel PTQ, ``qcore.quantize``): the program
lowers to a ``.pte`` with at least one XNNPACK delegate and no quantize/dequantize left outside
it (every quantized op delegated); ExecuTorch's runtime loads and runs it; its output is finite
and within ``PTE_STEPS`` quantization steps (of the program's coarsest activation scale) of the
q/dq program's. ``QCORE_FUZZ_PROFILE=fuzz`` runs thousands of examples.

The regression cases are the graph shapes the fuzzer once found failing on the device (a conv
residual, then cat, flatten/transpose and attention: ``Failed to create static transpose
node``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import event, given, note
from hypothesis.control import currently_in_test_context

import qcore
from qcore.testing.random_graphs import (
    BlockCall,
    RandomGraph,
    TensorSpec,
    fuzz_settings,
    largest_activation_scale,
    random_graphs,
)

pytestmark = pytest.mark.executorch
pytest.importorskip("executorch.runtime", exc_type=ImportError)

from qcore_xnnpack.lower_to_executorch import lower_to_executorch  # noqa: E402

#: .pte vs q/dq program: XNNPACK requantizes between ops in integer arithmetic where the q/dq
#: program rounds once per edge, so a deep graph may land a step or two apart: at least 2 steps,
#: and one step per requantizing compute op (conv/linear) in a graph with more of them (the
#: fuzzer's seed-704 chain of 4 shared convs measures 2.2 steps)
PTE_STEPS = 2.0
REQUANTIZING_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.conv1d.default, torch.ops.aten.linear.default)


def _pte_bound(converted: torch.fx.GraphModule) -> float:
    ops = sum(1 for n in converted.graph.nodes if n.op == "call_function" and n.target in REQUANTIZING_OPS)
    return max(PTE_STEPS, float(ops))


def _run_pte(pte: bytes, inputs: tuple) -> torch.Tensor:
    from executorch.runtime import Runtime

    outputs = Runtime.get().load_program(pte).load_method("forward").execute(list(inputs))
    return outputs[0]


def _check_pte(graph: RandomGraph, steps: "float | None" = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = qcore.quantize(graph.build(), graph.example_inputs, backend="xnnpack", calibration=graph.calibration,
                                measure_latency=False)
        program = lower_to_executorch(result.converted, graph.example_inputs)
    leftover = {op: n for op, n in program.not_delegated_ops.items() if op.startswith("quantized_decomposed.")}
    assert program.delegates >= 1, "no XNNPACK delegate"
    assert not leftover, f"quantized ops outside the delegate: {leftover}"
    if currently_in_test_context():
        event("fully delegated" if program.fully_delegated else "float ops outside the delegate")
    with torch.no_grad():
        reference = result.converted(*graph.example_inputs)
    actual = _run_pte(program.pte, graph.example_inputs)
    assert actual.shape == reference.shape and torch.isfinite(actual).all()
    step = largest_activation_scale(result.converted)
    steps = _pte_bound(result.converted) if steps is None else steps
    diff = (actual - reference).abs().max().item()
    if currently_in_test_context():
        note(f".pte vs q/dq: max |diff| {diff:.3g} ({diff / step if step else float('inf'):.2f} steps of {step:.3g})")
    assert diff <= steps * step + 1e-5, f".pte differs from the q/dq program by {diff:.4g} (step {step:.4g})"


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz_settings(max_examples=10)
@given(graph=random_graphs(dynamic_batch=False))
def test_xnnpack_pte_loads_delegates_every_quantized_op_and_matches(graph):
    note(graph.to_source())
    _check_pte(graph)


def _attention_after_cat_graphs() -> dict:
    image, image8, seq = TensorSpec("image", (4, 4, 4)), TensorSpec("image", (8, 4, 4)), TensorSpec("sequence", (16, 8))
    residual = BlockCall("residual", (("bn", False), ("act", "none"), ("skip_first", False), ("post_relu", False)),
                         image, image)
    to_sequence = BlockCall("to_sequence", (("how", "flatten_transpose"),), image8, seq)
    return {
        f"heads{heads}_residual{res}": RandomGraph(image, (
            residual,
            BlockCall("cat", (("variant", "twice"),), image, image8),
            to_sequence,
            BlockCall("self_attention", (("heads", heads), ("residual", res)), seq, seq)))
        for heads in (1, 2) for res in (False, True)
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(_attention_after_cat_graphs()))
def test_conv_residual_cat_then_attention_pte_loads_and_matches(name):
    _check_pte(_attention_after_cat_graphs()[name])


def _shared_conv_graph() -> RandomGraph:
    """A conv module called twice (shared_block): ExecuTorch's annotator skips the second call
    (its partition check asks the shared weight too), and that call's .pte node reads an int8
    input with a float weight: ``Failed to create convolution node``. qcore quantizes both."""
    image = TensorSpec("image", (8, 8, 4))
    return RandomGraph(input=image, batch=3, dynamic_batch=False, seed=704, blocks=(
        BlockCall("shared_block", (("use", "chain"), ("bn", True)), image, image),
        BlockCall("shared_block", (("use", "chain"), ("bn", False)), image, image),
        BlockCall("global_pool", (("how", "adaptive_avg"),), image, TensorSpec("vector", (8,))),
    ))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_shared_conv_called_twice_quantizes_both_calls_and_its_pte_loads():
    graph = _shared_conv_graph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = qcore.quantize(graph.build(), graph.example_inputs, backend="xnnpack", calibration=graph.calibration,
                                measure_latency=False)
    convs = [n for n in result.converted.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default]
    assert len(convs) == 4
    for conv in convs:  # every call reads a dequantized input and a dequantized weight
        assert all("dequantize" in str(arg.target) for arg in conv.args[:2]), conv.format_node()
    # four convs in a chain, each requantized by XNNPACK in integer arithmetic: up to a step of
    # rounding per conv (measured: 2.2 steps of the coarsest scale)
    _check_pte(graph, steps=4.0)
