"""The random graph generator (qcore.testing.random_graphs): every graph it draws is a valid
model (exports, runs finite, rebuilds from its own source), the same seed gives the same
module, shrinking gives small graphs, every block of the grammar can be drawn. Core only: no
backend plugin is needed.

``QCORE_FUZZ_PROFILE=fuzz`` runs the property tests with thousands of examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import find, given, note, settings

from qcore.testing import random_graphs as rg
from qcore.testing.random_graphs import BLOCKS, RandomGraph, fuzz_settings, random_graphs

FIND = settings(database=None, derandomize=True, max_examples=3000, deadline=None)


def _exec_source(graph: RandomGraph) -> dict:
    namespace: dict = {"__name__": "pasted_regression_test"}
    exec(compile(graph.to_source(), "<pasted>", "exec"), namespace)  # noqa: S102 (the point of the test)
    return namespace


def _other_batch(graph: RandomGraph, batch: int) -> tuple:
    return _exec_source(graph)["make_inputs"](graph.seed, batch)


@fuzz_settings(max_examples=15)
@given(graph=random_graphs())
def test_every_graph_exports_runs_finite_and_rebuilds_from_its_source(graph):
    note(graph.to_source())
    model = graph.build()
    assert not model.training
    with torch.no_grad():
        eager = model(*graph.example_inputs)
    assert eager.shape == (graph.batch, *graph.output_spec.shape)
    assert eager.dtype == graph.output_spec.dtype
    assert torch.isfinite(eager).all()

    program = torch.export.export(model, graph.example_inputs, dynamic_shapes=graph.dynamic_shapes).module()
    with torch.no_grad():
        torch.testing.assert_close(program(*graph.example_inputs), eager, rtol=1e-4, atol=1e-5)
        for batch in graph.calibration:
            assert torch.isfinite(program(*batch)).all()
        if graph.dynamic_batch:  # the batch dimension is really dynamic in the exported program
            other = _other_batch(graph, graph.batch + 2)
            torch.testing.assert_close(program(*other), model(*other), rtol=1e-4, atol=1e-5)

    # the source is self-contained (torch only) and rebuilds the same module and inputs
    namespace = _exec_source(graph)
    rebuilt = namespace["make_model"]()
    assert type(rebuilt).__name__ == "RandomGraphModel" and not rebuilt.training
    for (name, a), (name_b, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert name == name_b and torch.equal(a, b), name
    inputs = namespace["make_inputs"]()
    assert all(torch.equal(a, b) for a, b in zip(inputs, graph.example_inputs, strict=True))
    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), eager)
        # for the same state, whatever it is: load the model's state into a fresh rebuilt module
        state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        other = namespace["RandomGraphModel"]().eval()
        other.load_state_dict(state)
        assert torch.equal(other(*inputs), model(*inputs))
    calibration = namespace["make_calibration"]()
    assert len(calibration) == len(graph.calibration) == graph.calibration_batches
    assert all(torch.equal(a, b) for x, y in zip(calibration, graph.calibration) for a, b in zip(x, y))
    assert (namespace["make_dynamic_shapes"]() is None) == (not graph.dynamic_batch)


@fuzz_settings(max_examples=25)
@given(graph=random_graphs())
def test_the_same_seed_gives_the_same_module(graph):
    first, second = graph.build(), graph.build()
    assert first is not second
    assert list(first.state_dict()) == list(second.state_dict())
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(first(*graph.example_inputs), second(*graph.example_inputs))
    # an equal graph drawn again (a new object, nothing cached) gives the same module and inputs
    again = RandomGraph(graph.input, graph.blocks, graph.seed, graph.batch, graph.dynamic_batch, graph.calibration_batches)
    assert again == graph and again.to_source() == graph.to_source()
    assert all(torch.equal(a, b) for a, b in zip(again.example_inputs, graph.example_inputs))
    assert all(torch.equal(a, b) for a, b in zip(again.build().state_dict().values(), first.state_dict().values()))
    # another seed: other parameters (when there are any) and other inputs
    reseeded = RandomGraph(graph.input, graph.blocks, graph.seed + 1, graph.batch, graph.dynamic_batch)
    params = [p for p in first.parameters() if p.numel() > 1]
    if params:
        assert any(not torch.equal(a, b) for a, b in zip(params, [p for p in reseeded.build().parameters() if p.numel() > 1]))
    if graph.example_inputs[0].numel() > 4 and graph.example_inputs[0].is_floating_point():
        assert not torch.equal(reseeded.example_inputs[0], graph.example_inputs[0])


@fuzz_settings(max_examples=200)
@given(graph=random_graphs())
def test_drawn_graphs_respect_the_limits(graph):
    assert 3 <= len(graph.blocks) <= 12
    spec = graph.input
    for call in graph.blocks:
        assert call.input == spec and BLOCKS[call.block].accepts(spec, rg.Limits())
        spec = call.output
        assert all(d >= 1 for d in spec.shape)
        assert spec.kind != "image" or max(spec.shape[1:]) <= 32
    assert 2 <= graph.batch <= 4


def test_shrinking_gives_a_small_graph():
    graph = find(random_graphs(), lambda g: "cat" in g.block_names, settings=FIND)
    assert len(graph.blocks) == 3, graph.describe()
    assert max(graph.input.shape) <= 4, graph.describe()  # the smallest input of its kind
    assert max(call.output.channels for call in graph.blocks) <= 4, graph.describe()
    assert not graph.dynamic_batch and graph.batch == 2 and graph.seed == 0


def test_every_block_of_the_grammar_is_drawn():
    seen: set = set()

    @settings(database=None, derandomize=True, max_examples=400, deadline=None)
    @given(graph=random_graphs())
    def draw(graph):
        seen.update(graph.block_names)

    draw()
    assert seen == set(BLOCKS), f"never drawn: {sorted(set(BLOCKS) - seen)}"


@fuzz_settings(max_examples=30)
@given(graph=random_graphs(min_blocks=1, max_blocks=4, blocks=["conv_bn_act", "pool", "cat"], sequence=False,
                           tokens=False, vector=False))
def test_blocks_and_inputs_restrict_the_grammar(graph):
    assert set(graph.block_names) <= {"conv_bn_act", "pool", "cat"}
    assert graph.input.kind == "image" and 1 <= len(graph.blocks) <= 4


@pytest.mark.parametrize("kwargs", [{"blocks": ["no_such_block"]}, {"min_blocks": 0}, {"min_blocks": 5, "max_blocks": 4},
                                    {"blocks": ["self_attention"], "sequence": False}])
def test_bad_arguments_are_errors(kwargs):
    with pytest.raises(ValueError):
        random_graphs(**kwargs)


def test_the_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(rg.FUZZ_PROFILE_ENV, raising=False)
    assert rg.selected_profile() == "qcore"
    default = fuzz_settings(max_examples=7)
    assert default.max_examples == 7 and default.derandomize and default.database is None and default.deadline is None
    monkeypatch.setenv(rg.FUZZ_PROFILE_ENV, "fuzz")
    assert rg.selected_profile() == "fuzz"
    fuzz = fuzz_settings(max_examples=7)
    assert fuzz.max_examples == settings.get_profile("fuzz").max_examples != 7  # the profile's count wins
    assert not fuzz.derandomize and fuzz.deadline is None and fuzz.database is None
    monkeypatch.setenv(rg.FUZZ_PROFILE_ENV, "nonsense")
    with pytest.raises(ValueError, match="QCORE_FUZZ_PROFILE"):
        rg.selected_profile()
