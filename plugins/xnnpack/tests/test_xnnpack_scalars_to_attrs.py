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
