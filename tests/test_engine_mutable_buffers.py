"""``convert_pt2e(fold_quantize_into_mutable_buffers=True)``: a float buffer read through q -> dq
and written back with ``copy_`` (the KV-cache pattern) is stored as int8, with torchao's guards
(the cases of torchao's own tests, written here)."""

from __future__ import annotations

import pytest
import torch
from torch.ao.quantization import observer
from torch.fx import Node

import qcore
from qcore.errors import MutableBufferFoldError
from qcore.quantizer import Quantizer
from qcore.spec import QuantizationAnnotation, QuantizationSpec, SharedQuantizationSpec

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
INDEX_PUT = (aten.index_put.default, aten.index_put_.default)
INITIAL = torch.tensor([1.0, 2.0, 3.0, 4.0])


def int8_spec() -> QuantizationSpec:
    return QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=observer.default_observer, quant_min=-128,
                            quant_max=127, qscheme=torch.per_tensor_symmetric)


class IndexPutQuantizer(Quantizer):
    """The buffer input of index_put quantized; its output shares it (or has its own observer)."""

    def __init__(self, share_observer: bool = True) -> None:
        self.share_observer = share_observer

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in INDEX_PUT:
                buffer, value = node.args[0], node.args[2]
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={buffer: int8_spec(), value: None},
                    output_qspec=SharedQuantizationSpec((buffer, node)) if self.share_observer else int8_spec(),
                    _annotated=True)
        return model

    def validate(self, model):
        pass


class KVCache(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", INITIAL.clone())

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        updated = self.buf.index_put((idx,), x)
        self.buf.copy_(updated)
        return updated.clone()


INPUTS = (torch.tensor([5.0, 6.0]), torch.tensor([1, 3]))


def prepared_model(module: torch.nn.Module, quantizer: Quantizer, inputs=INPUTS) -> torch.fx.GraphModule:
    prepared = qcore.prepare_pt2e(torch.export.export(module.eval(), inputs).module(), quantizer)
    prepared(*inputs)
    for name, value in prepared.named_buffers():
        if name == "buf":
            value.copy_(INITIAL)  # calibration wrote the cache: start from the initial value again
    return prepared


def calls(model: torch.fx.GraphModule, targets) -> list[Node]:
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target in tuple(targets)]


def test_the_cache_is_stored_as_int8_and_each_call_reads_the_last_write():
    prepared = prepared_model(KVCache(), IndexPutQuantizer())
    converted = qcore.convert_pt2e(prepared, fold_quantize_into_mutable_buffers=True)

    assert dict(converted.named_buffers())["buf"].dtype == torch.int8
    assert "buf" in converted.state_dict()
    assert dict(prepared.named_buffers())["buf"].dtype == torch.float32  # the prepared model is untouched
    (index_put,) = calls(converted, INDEX_PUT)
    read = index_put.args[0]
    assert read.target is qd.dequantize_per_tensor.default
    assert read.args[0].op == "get_attr" and read.args[0].target == "buf"
    assert read.args[0].meta["val"].dtype == torch.int8
    (write,) = [u for u in index_put.users if u.target is qd.quantize_per_tensor.default]
    (copy,) = calls(converted, (aten.copy_.default,))
    assert copy.args[1] is write  # the int8 value is written back
    assert len(calls(converted, (qd.quantize_per_tensor.default,))) == 1  # the read quantize is gone

    expected = INITIAL.clone()
    expected.index_put_((INPUTS[1],), INPUTS[0])
    torch.testing.assert_close(converted(*INPUTS), expected, atol=0.03, rtol=0)
    second = (torch.tensor([2.5, 4.5]), torch.tensor([0, 2]))
    expected.index_put_((second[1],), second[0])
    torch.testing.assert_close(converted(*second), expected, atol=0.03, rtol=0)

    reexported = torch.export.export(converted, INPUTS).run_decompositions({})
    assert set(reexported.graph_signature.buffers_to_mutate.values()) == {"buf"}


class FanoutCache(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("buf", INITIAL.clone())

    def forward(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        value = self.buf.clone()
        updated = value + x + value * factor
        self.buf.copy_(updated)
        return updated.clone()


class ReadWriteQuantizer(Quantizer):
    """The buffer's read (clone) and its written value observed independently."""

    def annotate(self, model):
        buffer = next(n for n in model.graph.nodes if n.op == "get_attr" and n.target == "buf")
        copy = next(n for n in buffer.users if n.target is aten.copy_.default)
        (read,) = set(buffer.users) - {copy}
        read.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={buffer: int8_spec()}, _annotated=True)
        copy.args[1].meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=int8_spec(), _annotated=True)
        return model

    def validate(self, model):
        pass


def test_a_buffer_read_by_several_ops_through_one_dequantize_is_folded():
    inputs = (torch.full((4,), 0.25), torch.full((4,), 0.1))
    prepared = prepared_model(FanoutCache(), ReadWriteQuantizer(), inputs)
    converted = qcore.convert_pt2e(prepared, fold_quantize_into_mutable_buffers=True)
    assert dict(converted.named_buffers())["buf"].dtype == torch.int8
    buffer = next(n for n in converted.graph.nodes if n.op == "get_attr" and n.target == "buf")
    (read,) = [u for u in buffer.users if u.target is qd.dequantize_per_tensor.default]
    (copy,) = calls(converted, (aten.copy_.default,))
    assert copy.args[1].target is qd.quantize_per_tensor.default
    assert tuple(read.args[1:6]) == tuple(copy.args[1].args[1:6])  # read on the grid it is written on
    expected = INITIAL + inputs[0] + INITIAL * inputs[1]
    torch.testing.assert_close(converted(*inputs), expected, atol=0.05, rtol=0)


def test_independently_observed_read_and_write_store_on_the_write_grid():
    prepared = prepared_model(KVCache(), IndexPutQuantizer(share_observer=False))
    (index_put,) = calls(prepared, INDEX_PUT)
    read_observer = prepared.get_submodule(index_put.args[0].target)
    write_observer = prepared.get_submodule(next(u for u in index_put.users if u.op == "call_module").target)
    write_scale = write_observer.calculate_qparams()[0].item()
    assert read_observer.calculate_qparams()[0].item() != write_scale
    converted = qcore.convert_pt2e(prepared, fold_quantize_into_mutable_buffers=True)
    (index_put,) = calls(converted, INDEX_PUT)
    write = next(u for u in index_put.users if u.target is qd.quantize_per_tensor.default)
    assert tuple(index_put.args[0].args[1:6]) == tuple(write.args[1:6])
    assert index_put.args[0].args[1] == pytest.approx(write_scale)
    expected = INITIAL.clone()
    expected.index_put_((INPUTS[1],), INPUTS[0])
    torch.testing.assert_close(converted(*INPUTS), expected, atol=0.05, rtol=0)


def test_off_by_default_and_left_float_without_an_explicit_copy():
    assert dict(qcore.convert_pt2e(prepared_model(KVCache(), IndexPutQuantizer())).named_buffers())["buf"].dtype == torch.float32

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("buf", torch.zeros(4))

        def forward(self, x, idx):
            return self.buf.index_put_((idx,), x).clone()

    converted = qcore.convert_pt2e(prepared_model(InPlace(), IndexPutQuantizer()), fold_quantize_into_mutable_buffers=True)
    assert dict(converted.named_buffers())["buf"].dtype == torch.float32


def test_bad_requests_are_one_line_errors():
    prepared = prepared_model(KVCache(), IndexPutQuantizer())
    with pytest.raises(ValueError, match="fold_quantize_into_mutable_buffers=True requires fold_quantize=True"):
        qcore.convert_pt2e(prepared, fold_quantize=False, fold_quantize_into_mutable_buffers=True)
    with pytest.raises(TypeError, match="fold_quantize_into_mutable_buffers must be True or False"):
        qcore.convert_pt2e(prepared, fold_quantize_into_mutable_buffers="yes")


def test_a_buffer_aliasing_another_registered_buffer_is_refused_by_name():
    prepared = prepared_model(KVCache(), IndexPutQuantizer())
    prepared.register_buffer("alias_of_buf", dict(prepared.named_buffers())["buf"])  # same storage
    with pytest.raises(MutableBufferFoldError, match=r"buffer 'buf' shares its storage with the registered buffers \['alias_of_buf'\]"):
        qcore.convert_pt2e(prepared, fold_quantize_into_mutable_buffers=True)
    assert dict(prepared.named_buffers())["buf"].dtype == torch.float32
