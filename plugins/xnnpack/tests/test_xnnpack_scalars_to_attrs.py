"""transform_for_annotation: scalar operands of add/mul become observed tensor constants."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

from _xnnpack_helpers import export, quantizer
from qcore_xnnpack.convert_scalars_to_attrs import convert_scalars_to_attrs


class Scalars(torch.nn.Module):
    def forward(self, x):
        y = x + 1.0
        y = y * 3
        y = y.add(2.0, alpha=2)  # alpha is a kwarg: left alone, 2.0 converted
        y = y - 5.0  # sub: untouched
        return y


def _constants(gm):
    return [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant_")]


def test_scalars_become_zero_dim_float32_buffers_with_fake_vals():
    gm = export(Scalars(), torch.randn(2, 3))
    new = quantizer().transform_for_annotation(gm)
    constants = _constants(new)
    assert [c.target for c in constants] == ["_tensor_constant_0", "_tensor_constant_1", "_tensor_constant_2"]
    values = [getattr(new, c.target) for c in constants]
    assert [v.item() for v in values] == [1.0, 3.0, 2.0]
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in values)
    assert all(isinstance(c.meta["val"], FakeTensor) for c in constants)
    assert set(dict(new.named_buffers())) >= {c.target for c in constants}
    add_alpha = next(n for n in new.graph.nodes if n.name == "add_1")
    assert add_alpha.kwargs == {"alpha": 2}
    sub = next(n for n in new.graph.nodes if n.name == "sub")
    assert sub.args[1] == 5.0


def test_outputs_are_unchanged_and_the_input_model_is_not_mutated():
    gm = export(Scalars(), torch.randn(2, 3))
    before = str(gm.graph)
    new = quantizer().transform_for_annotation(gm)
    x = torch.randn(2, 3)
    torch.testing.assert_close(new(x), Scalars()(x))
    assert str(gm.graph) == before and not _constants(gm)


def test_nothing_to_convert_returns_the_model_itself():
    class NoScalars(torch.nn.Module):
        def forward(self, a, b):
            return a + b

    gm = export(NoScalars(), torch.randn(2), torch.randn(2))
    assert quantizer().transform_for_annotation(gm) is gm
    assert convert_scalars_to_attrs(gm) is False


def test_constant_names_skip_taken_ones():
    gm = export(Scalars(), torch.randn(2, 3))
    gm.register_buffer("_tensor_constant_0", torch.tensor(7.0))
    assert convert_scalars_to_attrs(gm) is True
    assert [c.target for c in _constants(gm)] == ["_tensor_constant_1", "_tensor_constant_2", "_tensor_constant_3"]


class IntegerArithmetic(torch.nn.Module):
    """Position ids computed on int64 tensors beside float arithmetic (GPT-2 / Llama style)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)

    def forward(self, x):
        pos = torch.arange(x.shape[1]) + 0  # int64 + int scalar
        pos = pos * 2  # int64 * int scalar
        scaled = pos * 0.5  # int64 * float scalar: a float result, still integer arithmetic
        return x * 0.5 + self.emb(pos) + scaled[None, :, None]


def test_integer_arithmetic_keeps_its_scalars_and_float_arithmetic_converts():
    gm = export(IntegerArithmetic(), torch.randn(1, 6, 4))
    new = quantizer().transform_for_annotation(gm)
    by_name = {n.name: n for n in new.graph.nodes}
    assert by_name["add"].args[1] == 0 and by_name["add"].meta["val"].dtype == torch.int64
    assert by_name["mul"].args[1] == 2 and by_name["mul"].meta["val"].dtype == torch.int64
    assert by_name["mul_1"].args[1] == 0.5  # the int64 operand rules it out though the result is float
    float_mul = by_name["mul_2"]
    assert float_mul.args[0].name == "x" and float_mul.args[1].op == "get_attr"
    assert [c.target for c in _constants(new)] == ["_tensor_constant_0"]
    x = torch.randn(1, 6, 4)
    torch.testing.assert_close(new(x), gm(x))


def test_integer_only_arithmetic_is_not_a_scalar_operand():
    class Counter(torch.nn.Module):
        def forward(self, ids):
            return (ids + 1) * 3

    gm = export(Counter(), torch.arange(4))
    assert quantizer().transform_for_annotation(gm) is gm
    assert convert_scalars_to_attrs(gm) is False


def test_an_operand_without_a_recorded_value_keeps_its_scalar():
    gm = export(Scalars(), torch.randn(2, 3))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    del x.meta["val"]
    converted = convert_scalars_to_attrs(gm)
    add = next(n for n in gm.graph.nodes if n.name == "add")
    assert add.args[1] == 1.0  # its only tensor operand is x, whose dtype is unknown
    assert converted is True  # mul reads add, whose val is known float32


def test_zero_dim_operands_get_a_constant_of_their_dtype():
    class HalfScalar(torch.nn.Module):
        def forward(self, x):
            return x * 3.0

    x = torch.tensor(2.0, dtype=torch.float16)
    gm = export(HalfScalar(), x)
    new = quantizer().transform_for_annotation(gm)
    (constant,) = _constants(new)
    assert getattr(new, constant.target).dtype == torch.float16
    assert new(x).dtype == torch.float16 and new(x).item() == 6.0
    # dim >= 1 operands get float32 constants (they do not promote the result)
    y = torch.randn(3, dtype=torch.float16)
    new = quantizer().transform_for_annotation(export(HalfScalar(), y))
    (constant,) = _constants(new)
    assert getattr(new, constant.target).dtype == torch.float32 and new(y).dtype == torch.float16
