"""In-place ops and buffer mutations: the written argument is not observed, the buffers the
program writes stay written, and a buffer read after an in-place update reads the new value.

Every case runs the float model and the converted program from the same buffer state and
compares both the output and every buffer after the call (within a few quantization steps of
the values written).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qcore
from qcore.passes.mutations import mutated_roots
from qcore.testing.graph_ops import op_counts

qcore_xnnpack = pytest.importorskip("qcore_xnnpack")


def xnnpack(is_qat: bool = False):
    return qcore_xnnpack.XNNPACKQuantizer().set_global(qcore_xnnpack.get_symmetric_quantization_config(is_qat=is_qat))


class Cached(torch.nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("buf", torch.zeros(2, 4))
        self.register_buffer("cache", torch.zeros(8, 4))
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


CASES = {
    "index_put_": lambda s, x: (s.cache.index_put_((torch.tensor([1, 3]),), s.lin(x)), s.lin(s.cache))[1],
    "index_put_accumulate": lambda s, x: (s.cache.index_put_((torch.tensor([1, 3]),), s.lin(x), accumulate=True), s.lin(s.cache))[1],
    "add_": lambda s, x: (s.buf.add_(s.lin(x)), s.lin(s.buf))[1],
    "add_alpha": lambda s, x: (s.buf.add_(s.lin(x), alpha=0.5), s.lin(s.buf))[1],
    "copy_": lambda s, x: (s.buf.copy_(s.lin(x)), s.lin(s.buf))[1],
    "read_then_copy_": lambda s, x: (s.lin(s.buf), s.buf.copy_(s.lin(x)))[0],
    "slice_copy_": lambda s, x: (s.cache[2:4].copy_(s.lin(x)), s.lin(s.cache))[1],
    "index_copy_": lambda s, x: (s.cache.index_copy_(0, torch.tensor([0, 5]), s.lin(x)), s.lin(s.cache))[1],
}

ACCUMULATING = {"index_put_accumulate", "add_", "add_alpha"}


def _written_buffers(gm):
    return sorted(str(n.target) for n in mutated_roots(gm) if n.op == "get_attr")


def _run_from(model, state, x):
    with torch.no_grad():
        for name, value in model.named_buffers():
            if name in state:
                value.copy_(state[name])
        out = model(x)
    return out, {name: value.clone() for name, value in model.named_buffers() if name in state}


def _quantize(model, example, is_qat, calibration=()):
    exported = torch.export.export(model, example).module()
    prepare = qcore.prepare_qat_pt2e if is_qat else qcore.prepare_pt2e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qcore.passes.insert_observers.QuantizationWarning)
        prepared = prepare(exported, xnnpack(is_qat))
        with torch.no_grad():
            for x in [*calibration, *(torch.randn_like(example[0]) for _ in range(3))]:
                prepared(x)
        return exported, prepared, qcore.convert_pt2e(prepared)


@pytest.mark.parametrize("is_qat", [False, True], ids=["ptq", "qat"])
@pytest.mark.parametrize("case", list(CASES))
def test_buffer_mutations_are_kept_and_values_follow_float(case, is_qat):
    torch.manual_seed(0)
    model = Cached(CASES[case])
    example, x = (torch.randn(2, 4),), torch.randn(2, 4)
    exported, prepared, converted = _quantize(model, example, is_qat, calibration=[x])
    written = _written_buffers(exported)
    assert written  # every case writes a buffer
    assert _written_buffers(prepared) == written
    assert _written_buffers(converted) == written
    # no observer reads the tensor an in-place op writes, and no written buffer became a constant
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target._schema.name.endswith("_"):
            assert not node.args[0].meta.get("qcore_observer"), node
    assert not any("buf_quantized" in n or "cache_quantized" in n for n, _ in converted.named_buffers())
    state = {name: value.clone() for name, value in model.named_buffers()}  # the state calibration started from
    float_out, float_buffers = _run_from(copy.deepcopy(model), state, x)
    quant_out, quant_buffers = _run_from(converted, state, x)
    step = 0.05  # a few int8 steps of these ranges
    assert (quant_out - float_out).abs().max() < step
    for name in written:
        assert (quant_buffers[name] - float_buffers[name]).abs().max() < step, name
    if case in ACCUMULATING or is_qat:  # past the calibrated range (QAT: moving averages over 4 steps)
        return
    # a second call reads what the first one wrote
    float_out, _ = _run_from(copy.deepcopy(model), float_buffers, x)
    quant_out, _ = _run_from(converted, quant_buffers, x)
    assert (quant_out - float_out).abs().max() < step


def test_index_put_into_a_buffer_keeps_torchaos_qdq_counts():
    torch.manual_seed(0)
    _, prepared, converted = _quantize(Cached(CASES["index_put_"]), (torch.randn(2, 4),), is_qat=False)
    index_put = next(n for n in prepared.graph.nodes if n.target is torch.ops.aten.index_put_.default)
    assert index_put.args[0].op == "get_attr"  # the cache itself, not an observer of it
    # linear: input, weight, output; index_put_ shares its value's observer; the second linear
    # reads the updated cache through its own q/dq; weight folded once per use
    counts = op_counts(converted)
    assert counts["quantize_per_tensor"] == 4
    assert counts["index_put_"] == 1


def test_read_before_write_is_observed_where_it_is_read():
    torch.manual_seed(0)
    _, prepared, _ = _quantize(Cached(CASES["slice_copy_"]), (torch.randn(2, 4),), is_qat=False)
    nodes = list(prepared.graph.nodes)
    copy_ = next(n for n in nodes if n.target is torch.ops.aten.copy_.default)
    second_linear = [n for n in nodes if n.target is torch.ops.aten.linear.default][1]
    observer = second_linear.args[0]
    assert observer.meta.get("qcore_observer") and observer.args[0].target == "cache"
    assert nodes.index(copy_) < nodes.index(observer) < nodes.index(second_linear)


def test_a_written_user_input_is_observed_as_torchao_does():
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return self.lin(y.add_(x))

    torch.manual_seed(0)
    model = M()
    x = torch.randn(2, 4)
    _, prepared, converted = _quantize(model, (torch.randn(2, 4),), is_qat=False, calibration=[x])
    add_ = next(n for n in prepared.graph.nodes if n.target is torch.ops.aten.add_.Tensor)
    assert all(arg.meta.get("qcore_observer") for arg in add_.args)  # an intermediate, not a buffer
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 0.05
