"""Shared helpers of the x86 recipe tests (test_onednn_recipes_*.py): run one recipe through
qcore and, where torchao is installed, through torchao's X86InductorQuantizer on the same model,
and count the q/dq ops of the converted programs."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import pytest
import torch

import qcore
from qcore.testing.graph_ops import op_counts, op_name
from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

#: the q/dq ops counted, in the order of :func:`qdq_counts`
COUNTED = ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel", "choose_qparams")

Setup = Callable[[Any, Any], Any]  # (quantizer, config) -> quantizer


def config(is_qat: bool = False, is_dynamic: bool = False) -> qcore.QuantizationConfig:
    """qcore's x86 config with torchao's ranges (full 8 bits: a VNNI target)."""
    return get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic, target="avx512_vnni")


def qdq_counts(converted: torch.fx.GraphModule) -> dict[str, int]:
    counts = op_counts(converted)
    return {name: counts.get(name, 0) for name in COUNTED}


def calibration_batches(example: tuple, count: int = 4) -> list[tuple]:
    generator = torch.Generator().manual_seed(1)
    return [tuple(torch.randn(t.shape, generator=generator) for t in example) for _ in range(count)] + [example]


def convert(model: torch.nn.Module, example: tuple, quantizer: Any, is_qat: bool = False, peer: Optional[Any] = None) -> torch.fx.GraphModule:
    """Export a copy of ``model``, prepare (QAT: prepare_qat) with ``quantizer``, calibrate on a few
    batches, convert; with the ``peer`` module (torchao's quantize_pt2e) instead of qcore's verbs."""
    flow = peer if peer is not None else qcore
    model = copy.deepcopy(model)
    model = model.train() if is_qat else model.eval()
    exported = torch.export.export(model, example).module()
    prepare = flow.prepare_qat_pt2e if is_qat else flow.prepare_pt2e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(exported, quantizer)
        for batch in calibration_batches(example):
            prepared(*batch)
        return flow.convert_pt2e(prepared)


def ours(model: torch.nn.Module, example: tuple, setup: Setup, is_qat: bool = False, is_dynamic: bool = False) -> torch.fx.GraphModule:
    return convert(model, example, setup(X86InductorQuantizer(), config(is_qat, is_dynamic)), is_qat)


def theirs(model: torch.nn.Module, example: tuple, setup: Setup, is_qat: bool = False, is_dynamic: bool = False) -> torch.fx.GraphModule:
    """The same recipe through torchao's X86InductorQuantizer (skips when torchao is absent)."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e import quantize_pt2e as ao
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as ao_x86

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer = setup(ao_x86.X86InductorQuantizer(), ao_x86.get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=is_dynamic))
    return convert(model, example, quantizer, is_qat, peer=ao)


def largest_step(converted: torch.fx.GraphModule) -> float:
    """The largest scale of a static per-tensor quantize of the program (one quantization step)."""
    scales = [float(n.args[1]) for n in converted.graph.nodes
              if n.op == "call_function" and n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default]
    return max(scales) if scales else 0.0


def max_diff(a: torch.fx.GraphModule, b: torch.fx.GraphModule, example: tuple) -> float:
    with torch.no_grad():
        return float((a(*example) - b(*example)).abs().max())


def assert_matches_torchao(model: torch.nn.Module, example: tuple, setup: Setup, is_qat: bool = False,
                           is_dynamic: bool = False, steps: float = 1.0) -> dict[str, int]:
    """qcore's and torchao's recipe give the same q/dq counts and outputs within ``steps``
    quantization steps of each other; returns the counts."""
    mine = ours(model, example, setup, is_qat, is_dynamic)
    peer = theirs(model, example, setup, is_qat, is_dynamic)
    assert qdq_counts(mine) == qdq_counts(peer)
    tolerance = steps * max(largest_step(mine), largest_step(peer)) * 1.01 + 1e-5
    diff = max_diff(mine, peer, example)
    assert diff <= tolerance, f"qcore's program differs from torchao's by {diff} > {tolerance}"
    return qdq_counts(mine)


def calls(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) == name]


def is_dequantize(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node.target).startswith("dequantize")


def is_quantize(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and op_name(node.target).startswith("quantize")
