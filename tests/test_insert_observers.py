"""Observer insertion: sharing groups, implicit sharing, derived and fixed specs, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.ao.quantization import observer as ao

from qcore.annotation import annotate_input, annotate_output
from qcore.errors import PrepareError
from qcore.passes.insert_observers import QuantizationWarning, insert_observers, is_observer_node
from qcore.spec import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    SharedQuantizationSpec,
)

INT8 = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=ao.MinMaxObserver, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
UINT8 = QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=ao.MinMaxObserver, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine)


class TwoRelu(torch.nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(x))


class Branches(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        return torch.sigmoid(y), torch.tanh(y)


class CatTwice(torch.nn.Module):
    def forward(self, a, b, c):
        first = torch.cat([torch.relu(a), torch.relu(b)])
        return torch.cat([first, torch.relu(c)])


def export(module, *inputs):
    return torch.export.export(module, inputs).module()


def calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def observers(gm):
    return [n for n in gm.graph.nodes if is_observer_node(n)]


def test_implicit_sharing_producer_output_and_consumer_input():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(first, INT8)
    annotate_input(second, first, INT8)
    prepared = insert_observers(gm)
    obs = observers(prepared)
    assert len(obs) == 1
    assert obs[0].args[0].name == "relu"
    assert calls(prepared)[1].args[0] is obs[0]


def test_no_implicit_sharing_when_the_consumer_forbids_it():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(first, INT8)
    second.meta["quantization_annotation"] = QuantizationAnnotation({first: INT8}, allow_implicit_sharing=False)
    prepared = insert_observers(gm)
    obs = observers(prepared)
    assert len(obs) == 2
    modules = {id(prepared.get_submodule(o.target)) for o in obs}
    assert len(modules) == 2
    assert obs[1].args[0] is obs[0]  # chained after the producer's output observer


def test_int8_output_and_uint8_input_give_two_observers_in_series():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(first, INT8)
    annotate_input(second, first, UINT8)
    prepared = insert_observers(gm)
    obs = observers(prepared)
    assert [prepared.get_submodule(o.target).dtype for o in obs] == [torch.int8, torch.uint8]
    assert obs[1].args[0] is obs[0] and calls(prepared)[1].args[0] is obs[1]


def test_unannotated_producer_two_consumers_share_one_observer():
    gm = export(Branches(), torch.randn(4))
    relu, sigmoid, tanh = calls(gm)
    annotate_input(sigmoid, relu, INT8)
    annotate_input(tanh, relu, INT8)
    prepared = insert_observers(gm)
    obs = observers(prepared)
    assert len(obs) == 1
    _, sigmoid, tanh = calls(prepared)
    assert sigmoid.args[0] is obs[0] and tanh.args[0] is obs[0]


def test_shared_spec_pointing_later_in_the_graph_and_chains():
    gm = export(CatTwice(), torch.randn(2), torch.randn(2), torch.randn(2))
    relu_a, relu_b, cat1, relu_c, cat2 = calls(gm)
    # relu_a shares with relu_c's output, which is defined later in the graph
    annotate_output(relu_a, SharedQuantizationSpec(relu_c))
    annotate_output(relu_b, SharedQuantizationSpec(relu_a))  # a chain: b -> a -> c
    annotate_output(relu_c, INT8)
    prepared = insert_observers(gm)
    modules = {id(prepared.get_submodule(o.target)) for o in observers(prepared)}
    assert len(observers(prepared)) == 3
    assert len(modules) == 1


def test_cat_style_sharing_makes_one_group():
    gm = export(CatTwice(), torch.randn(2), torch.randn(2), torch.randn(2))
    relu_a, relu_b, cat1, relu_c, cat2 = calls(gm)
    for relu in (relu_a, relu_b, relu_c):
        annotate_output(relu, INT8)
    shared1 = SharedQuantizationSpec((relu_a, cat1))
    cat1.meta["quantization_annotation"] = QuantizationAnnotation({relu_a: INT8, relu_b: shared1}, shared1)
    shared2 = SharedQuantizationSpec((cat1, cat2))
    cat2.meta["quantization_annotation"] = QuantizationAnnotation({cat1: INT8, relu_c: shared2}, shared2)
    prepared = insert_observers(gm)
    modules = {id(prepared.get_submodule(o.target)) for o in observers(prepared)}
    assert len(modules) == 1


def test_shared_spec_naming_an_unannotated_point_is_a_clear_error():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(second, SharedQuantizationSpec(first))
    with pytest.raises(PrepareError, match=r"points at the output of node 'relu', which has no quantization spec"):
        insert_observers(gm)


def test_shared_spec_naming_a_node_of_another_graph():
    other = calls(export(TwoRelu(), torch.randn(4)))[0]
    gm = export(TwoRelu(), torch.randn(4))
    annotate_output(calls(gm)[1], SharedQuantizationSpec(other))
    with pytest.raises(PrepareError, match="which is not in the graph"):
        insert_observers(gm)


def test_derived_spec_uses_the_source_observers():
    gm = export(torch.nn.Linear(3, 2), torch.randn(4, 3))
    linear = calls(gm)[0]
    x, weight, bias = linear.args
    weight_spec = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=ao.MinMaxObserver, qscheme=torch.per_tensor_symmetric)

    def derive(observers):
        act, w = observers
        (sa, _), (sw, _) = act.calculate_qparams(), w.calculate_qparams()
        return sa * sw, torch.zeros_like(sa, dtype=torch.int32)

    bias_spec = DerivedQuantizationSpec(
        derived_from=[(x, linear), (weight, linear)], derive_qparams_fn=derive, dtype=torch.int32, quant_min=-(2**31), quant_max=2**31 - 1,
        qscheme=torch.per_tensor_symmetric,
    )
    linear.meta["quantization_annotation"] = QuantizationAnnotation({x: INT8, weight: weight_spec, bias: bias_spec})
    prepared = insert_observers(gm)
    prepared(torch.randn(4, 3))
    x_obs, w_obs, b_obs = (prepared.get_submodule(arg.target) for arg in calls(prepared)[0].args)
    assert b_obs.obs_or_fqs[0] is x_obs and b_obs.obs_or_fqs[1] is w_obs
    scale, zero_point = b_obs.calculate_qparams()
    expected = x_obs.calculate_qparams()[0] * w_obs.calculate_qparams()[0]
    assert torch.equal(scale, expected) and int(zero_point) == 0


def test_fixed_qparams_spec_builds_a_fixed_observer():
    gm = export(torch.nn.Sigmoid(), torch.randn(4))
    sigmoid = calls(gm)[0]
    annotate_output(sigmoid, FixedQParamsQuantizationSpec(dtype=torch.uint8, scale=1 / 256, zero_point=0, quant_min=0, quant_max=255))
    prepared = insert_observers(gm)
    (obs,) = observers(prepared)
    scale, zero_point = prepared.get_submodule(obs.target).calculate_qparams()
    assert float(scale) == 1 / 256 and int(zero_point) == 0


def test_none_spec_inserts_nothing_and_integer_tensors_are_never_observed():
    class Index(torch.nn.Module):
        def forward(self, x):
            return torch.argmax(x, dim=0) + 1

    gm = export(Index(), torch.randn(4))
    argmax, add = calls(gm)
    annotate_output(argmax, INT8)
    annotate_input(add, argmax, None)
    with pytest.warns(QuantizationWarning, match=r"output of node 'argmax' is an integer/bool tensor \(torch.int64\)"):
        prepared = insert_observers(gm)
    assert observers(prepared) == []


def test_the_input_model_is_not_mutated_and_a_second_run_adds_nothing():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(first, INT8)
    before = [(n.name, n.op, tuple(str(a) for a in n.args)) for n in gm.graph.nodes]
    prepared = insert_observers(gm)
    assert [(n.name, n.op, tuple(str(a) for a in n.args)) for n in gm.graph.nodes] == before
    assert not any(name.startswith("activation_post_process") for name, _ in gm.named_children())
    again = insert_observers(prepared)
    assert len(observers(again)) == len(observers(prepared)) == 1


def test_placeholder_and_output_annotations():
    gm = export(TwoRelu(), torch.randn(4))
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    second = calls(gm)[1]
    annotate_output(placeholder, INT8)
    output.meta["quantization_annotation"] = QuantizationAnnotation({second: UINT8})
    prepared = insert_observers(gm)
    obs = observers(prepared)
    assert obs[0].args[0].op == "placeholder"
    out = next(n for n in prepared.graph.nodes if n.op == "output")
    assert is_observer_node(out.args[0][0])


def test_spec_on_a_kwarg_is_an_error_naming_the_node():
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    second.kwargs = {"extra": first}
    second.args = (first,)
    annotate_input(second, first, INT8)
    second.args = ()
    with pytest.raises(PrepareError, match=r"node 'relu_1' gives a spec to input 'relu', which is a keyword argument"):
        insert_observers(gm)


def test_observers_are_named_in_insertion_order_and_shared_instances_repeat():
    gm = export(Branches(), torch.randn(4))
    relu, sigmoid, tanh = calls(gm)
    annotate_output(relu, INT8)
    annotate_output(sigmoid, SharedQuantizationSpec(relu))
    annotate_output(tanh, UINT8)
    prepared = insert_observers(gm)
    names = [o.target for o in observers(prepared)]
    assert sorted(names) == [f"activation_post_process_{i}" for i in range(3)]
    assert prepared.activation_post_process_0 is prepared.activation_post_process_1


def test_is_qat_does_not_change_the_class_the_spec_names():
    from torch.ao.quantization.fake_quantize import FakeQuantize

    fq_spec = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=FakeQuantize, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    gm = export(TwoRelu(), torch.randn(4))
    first, second = calls(gm)
    annotate_output(first, fq_spec)
    annotate_output(second, INT8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = insert_observers(gm, is_qat=False)
    kinds = [type(prepared.get_submodule(o.target)).__name__ for o in observers(prepared)]
    assert kinds == ["FakeQuantize", "MinMaxObserver"]


def test_implicit_sharing_through_clone_and_eq_resolves_without_a_cycle():
    """x -> clone -> eq(clone, x), SharedQuantizationSpec on clone's output and on eq's second
    input: the three edges and clone's output share one observer (torchao's regression test for
    an endless unwrap; qcore groups edges with union-find)."""
    import qcore
    from qcore.quantizer import Quantizer
    from qcore.spec import QuantizationAnnotation, SharedQuantizationSpec

    class CloneEqQuantizer(Quantizer):
        def annotate(self, model):
            for node in model.graph.nodes:
                if node.target not in (torch.ops.aten.clone.default, torch.ops.aten.eq.Tensor):
                    continue
                shared = SharedQuantizationSpec((node.args[0], node))
                if node.target is torch.ops.aten.clone.default:
                    inputs, output = {node.args[0]: UINT8}, shared
                else:
                    inputs, output = {node.args[0]: UINT8, node.args[1]: shared}, None
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map=inputs, output_qspec=output, allow_implicit_sharing=True, _annotated=True
                )
            return model

        def validate(self, model):
            pass

    class CloneEq(torch.nn.Module):
        def forward(self, x):
            return torch.eq(x.clone(), x)

    x = torch.randn(1, 5)
    prepared = qcore.prepare_pt2e(torch.export.export(CloneEq().eval(), (x,)).module(), CloneEqQuantizer())
    prepared(x)
    modules = {id(prepared.get_submodule(o.target)) for o in observers(prepared)}
    assert len(observers(prepared)) == 2 and len(modules) == 1  # x's observer and clone's, one instance
    converted = qcore.convert_pt2e(prepared)
    qparams = {(float(n.args[1]), int(n.args[2])) for n in converted.graph.nodes
               if n.op == "call_function" and "quantize_per_tensor" in str(n.target)}
    assert len(qparams) == 1
    assert torch.equal(converted(x), torch.ones(1, 5, dtype=torch.bool))
