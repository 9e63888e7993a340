"""Integer-index inputs under the xnnpack quantizer: position ids and index math stay integer.

GPT-2, T5 and Llama compute embedding indices from int64 tensors (``arange(n) + 0``) and, in
T5, from float math cast back to int64 (relative position buckets). torchao's XNNPACK
quantizer turns the scalars of that arithmetic into float tensors and fails in calibration
(``Expected tensor for argument #1 'indices' to have one of the following scalar types``).
"""

from __future__ import annotations

import torch

from _xnnpack_helpers import export, qdq_counts, quantize, quantizer
from qcore.annotation import kept_float_reason
from qcore.pipeline import prepare_pt2e
from qcore_xnnpack.index_arithmetic import INDEX_ARITHMETIC_REASON, is_index_arithmetic


class PositionIds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        pos = torch.arange(x.shape[1]) + 0
        pos = pos * 2
        return self.lin(x * 0.5 + self.emb(pos))


class Buckets(torch.nn.Module):
    """T5-style relative position buckets: float log math on int64 offsets, cast back to int64."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 1)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        n = x.shape[1]
        rel = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs()
        large = (torch.log(rel.float() / 2) * 3.0).to(torch.long) + 2  # log(0) = -inf on the diagonal
        buckets = torch.where(rel < 2, rel, large.clamp(max=7))
        h = self.lin(x)
        return h @ h.transpose(1, 2) + self.emb(buckets).squeeze(-1)


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_position_ids_stay_int64_through_calibration_and_convert():
    torch.manual_seed(0)
    model, x = PositionIds().eval(), torch.randn(1, 6, 4)
    converted = quantize(model, (x,), quantizer("per_channel"))
    embedding = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.embedding.default)
    assert embedding.args[1].name == "mul" and embedding.args[1].args == (_node(converted, "add"), 2)
    # x, mul(x, 0.5)'s constant and output, embedding, add, linear: 5 activation quantizes
    assert qdq_counts(converted) == {"q": 5, "dq": 6, "dq_pc": 1}
    torch.testing.assert_close(converted(x), model(x), atol=0.05, rtol=0)


def test_index_math_is_kept_float_with_its_reason_and_calibrates_on_minus_inf():
    torch.manual_seed(0)
    model, x = Buckets().eval(), torch.randn(1, 6, 4)
    gm = export(model, x)
    assert is_index_arithmetic(_node(gm, "mul"), gm)
    assert not is_index_arithmetic(_node(gm, "add_1"), gm)  # matmul + embedding(weight): model data
    prepared = prepare_pt2e(gm, quantizer("per_channel"))
    mul = _node(prepared, "mul")
    assert kept_float_reason(mul) == INDEX_ARITHMETIC_REASON
    assert not any(u.op == "call_module" for u in mul.users) and mul.args[0].op == "call_function"
    prepared(x)  # the log is -inf on the diagonal: an observer there would refuse the batch
    converted = quantize(model, (x,), quantizer("per_channel"))
    # x, linear, transpose, matmul, embedding, add_1 (the bucket mul has none)
    assert qdq_counts(converted) == {"q": 6, "dq": 7, "dq_pc": 1}
    torch.testing.assert_close(converted(x), model(x), atol=0.1, rtol=0)


def test_float_arithmetic_on_model_data_is_not_index_arithmetic():
    class Data(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.rand(4))

        def forward(self, ids):
            freqs = torch.arange(ids.shape[1]).float()[:, None] * self.inv_freq[None, :]
            return freqs * 2.0, ids.float() * 2.0

    gm = export(Data(), torch.zeros(1, 5, dtype=torch.long))
    muls = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert [is_index_arithmetic(n, gm) for n in muls] == [False, False, True]
