"""The plugin manager: loading, failure paths, conflicts, ordering, the annotation guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qcore
from qcore.errors import AnnotationConflictError, PluginError, UnknownBackendError
from qcore.plugin_manager import PluginLoadWarning, QcorePluginManager, set_plugin_manager

from plugin_dists import TEST_GROUP, make_plugin_dist

GOOD_PLUGIN = """
import qcore

class ToyQuantizer(qcore.BackendQuantizer):
    backend = "toy"

@qcore.hookimpl
def qcore_register_backends():
    return [qcore.Backend(name="toy", quantizer_class=ToyQuantizer, description="a toy")]
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.delenv("QCORE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("QCORE_BLOCK_PLUGINS", raising=False)
    return path


def manager() -> QcorePluginManager:
    return QcorePluginManager(group=TEST_GROUP)


def test_import_qcore_loads_no_plugin_and_no_inductor():
    code = (
        "import sys, qcore, qcore.spec, qcore.quantizer, qcore.pipeline\n"
        "bad = [m for m in sys.modules if m.startswith(('torch._inductor', 'qcore_xnnpack', 'qcore_onednn_x86', 'torchao', 'executorch'))]\n"
        "assert not bad, bad\n"
        "from qcore.plugin_manager import get_plugin_manager\n"
        "assert get_plugin_manager()._pm is None\n"
        "print('clean')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout


def test_good_plugin_registers_its_backend(site):
    make_plugin_dist(site, "qcore-toy", "toy", "qcore_toy_good", GOOD_PLUGIN)
    pm = manager()
    backend = pm.get_backend("toy")
    assert backend.distribution == "qcore-toy"
    assert backend.plugin == "toy"
    info = {i.name: i for i in pm.plugin_infos()}
    assert info["toy"].status == "loaded"
    assert info["toy"].version == "1.2.3"
    assert info["toy"].hooks == ("qcore_register_backends",)
    assert info["toy"].backends == ("toy",)
    assert info["qcore"].hooks == tuple(sorted(info["qcore"].hooks))


def test_broken_plugin_is_skipped_with_a_warning(site):
    make_plugin_dist(site, "qcore-broken", "broken", "qcore_toy_broken", "raise RuntimeError('kaboom at import')\n")
    make_plugin_dist(site, "qcore-toy", "toy", "qcore_toy_good2", GOOD_PLUGIN)
    pm = manager()
    with pytest.warns(PluginLoadWarning, match=r"'broken' from distribution 'qcore-broken'.*RuntimeError: kaboom at import"):
        pm.pm
    info = {i.name: i for i in pm.plugin_infos()}
    assert info["broken"].status == "failed"
    assert "kaboom at import" in info["broken"].error
    assert pm.get_backend("toy").name == "toy"  # the others still work


def test_broken_plugin_raises_under_strict_mode(site, monkeypatch):
    make_plugin_dist(site, "qcore-broken", "broken", "qcore_toy_broken2", "raise RuntimeError('kaboom')\n")
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'broken' from distribution 'qcore-broken'.*kaboom"):
        manager().pm


def test_blocked_plugin_is_not_loaded(site, monkeypatch):
    make_plugin_dist(site, "qcore-toy", "toy", "qcore_toy_blocked", "raise RuntimeError('must not be imported')\n")
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "toy, other")
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    pm = manager()
    info = {i.name: i for i in pm.plugin_infos()}
    assert info["toy"].status == "blocked"
    assert "qcore_toy_blocked" not in sys.modules


def test_two_plugins_claiming_one_backend_name_both_distributions(site):
    make_plugin_dist(site, "qcore-toy-a", "toy_a", "qcore_toy_a", GOOD_PLUGIN)
    make_plugin_dist(site, "qcore-toy-b", "toy_b", "qcore_toy_b", GOOD_PLUGIN)
    with pytest.raises(PluginError, match=r"'toy' is registered twice.*'qcore-toy-a'.*'qcore-toy-b'"):
        manager().backends()


def test_misspelled_hook_names_the_plugin(site, monkeypatch):
    source = "import qcore\n\n@qcore.hookimpl\ndef annotate_ops(backend):\n    return []\n"
    make_plugin_dist(site, "qcore-typo", "typo", "qcore_toy_typo", source)
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin 'typo' implements 'annotate_ops', which is not a qcore hook; known hooks: annotate_op"):
        manager().pm


def test_misspelled_hook_without_strict_is_listed_as_failed(site):
    source = "import qcore\n\n@qcore.hookimpl\ndef lower_patterns(backend):\n    return []\n"
    make_plugin_dist(site, "qcore-typo", "typo", "qcore_toy_typo2", source)
    pm = manager()
    with pytest.warns(PluginLoadWarning, match="lower_patterns"):
        infos = {i.name: i for i in pm.plugin_infos()}
    assert infos["typo"].status == "failed"
    assert pm.pm.get_plugin("typo") is None


def test_unknown_backend_lists_installed_and_unavailable(site):
    source = GOOD_PLUGIN + """
@qcore.hookimpl(specname="qcore_register_backends")
def register_more():
    return [qcore.Backend(name="gpu_only", quantizer_class=ToyQuantizer, is_available=lambda: "needs a GPU")]
"""
    make_plugin_dist(site, "qcore-toy", "toy", "qcore_toy_unknown", source)
    pm = manager()
    with pytest.raises(UnknownBackendError) as info:
        pm.get_backend("tyo")
    message = str(info.value)
    assert "unknown backend 'tyo'" in message
    assert "installed backends: reference, toy" in message
    assert "gpu_only (needs a GPU)" in message


def test_unavailable_backend_says_why(site):
    source = GOOD_PLUGIN.replace('description="a toy"', 'description="a toy", is_available=lambda: "no oneDNN here"')
    make_plugin_dist(site, "qcore-toy", "toy", "qcore_toy_unavail", source)
    with pytest.raises(qcore.errors.BackendUnavailableError, match="no oneDNN here"):
        manager().get_backend("toy")


ANNOTATOR_PLUGIN = """
import qcore

def make(name, pattern, shares=False):
    def fn(model, config, filter_fn):
        model.meta.setdefault("order", []).append(name)
        return []
    return qcore.Annotator(name=name, fn=fn, priority=len(pattern), shares_input=shares)

@qcore.hookimpl
def annotate_op(backend):
    return [make(n, p, s) for n, p, s in {records}]
"""


@pytest.mark.parametrize("reverse", [False, True])
def test_annotator_order_is_independent_of_registration_order(site, reverse):
    a = [("conv", ("conv",), False), ("pool", ("max_pool2d",), True)]
    b = [("conv_bn_relu", ("conv", "batch_norm", "relu"), False), ("conv_bn", ("conv", "batch_norm"), False)]
    first, second = (b, a) if reverse else (a, b)
    make_plugin_dist(site, "qcore-ann-a", "aa", f"qcore_toy_ann_a{reverse}", ANNOTATOR_PLUGIN.format(records=first))
    make_plugin_dist(site, "qcore-ann-b", "bb", f"qcore_toy_ann_b{reverse}", ANNOTATOR_PLUGIN.format(records=second))
    names = [a.name for a in manager().annotators("toy")]
    assert names == ["conv_bn_relu", "conv_bn", "conv", "pool"]


def test_lowering_passes_follow_their_after_declarations(site):
    source = """
import qcore

def noop(model, context):
    return False

@qcore.hookimpl
def lower_pattern(backend):
    if backend != "toy":
        return [qcore.LoweringPass(name="other_backend", fn=noop)]
    return [
        qcore.LoweringPass(name="fuse", fn=noop, after=("prepack",)),
        qcore.LoweringPass(name="prepack", fn=noop, after=("promote", "optional_missing")),
        qcore.LoweringPass(name="promote", fn=noop),
    ]
"""
    make_plugin_dist(site, "qcore-lower", "lower", "qcore_toy_lower", source)
    assert [p.name for p in manager().lowering_passes("toy")] == ["promote", "prepack", "fuse"]
    assert [p.name for p in manager().lowering_passes("elsewhere")] == ["other_backend"]


def test_lowering_pass_cycle_is_an_error(site):
    source = """
import qcore
noop = lambda model, context: False

@qcore.hookimpl
def lower_pattern(backend):
    return [qcore.LoweringPass(name="a", fn=noop, after=("b",)),
            qcore.LoweringPass(name="b", fn=noop, after=("a",))]
"""
    make_plugin_dist(site, "qcore-cycle", "cycle", "qcore_toy_cycle", source)
    with pytest.raises(PluginError, match="cycle"):
        manager().lowering_passes("toy")


FEWER_ARGUMENTS_PLUGIN = """
import qcore

def noop(model, context):
    return False

def annotate_nothing(model, config, filter_fn):
    return []

@qcore.hookimpl
def annotate_op():
    return [qcore.Annotator(name="everywhere", fn=annotate_nothing)]

@qcore.hookimpl
def lower_pattern():
    return [qcore.LoweringPass(name="everywhere_pass", fn=noop)]

@qcore.hookimpl
def fuse_qat(model):
    model.meta["fused_by_fewer_arguments"] = True
    return True
"""


def test_a_hook_taking_fewer_arguments_than_its_spec_works(site):
    make_plugin_dist(site, "qcore-fewer", "fewer", "qcore_toy_fewer", FEWER_ARGUMENTS_PLUGIN)
    pm = manager()
    assert [a.name for a in pm.annotators("toy")] == ["everywhere"]
    assert [a.plugin for a in pm.annotators("anything")] == ["fewer"]
    assert [p.name for p in pm.lowering_passes("toy")] == ["everywhere_pass"]
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    assert pm.fuse_qat(gm) is True and gm.meta["fused_by_fewer_arguments"]


WRAPPER_PLUGIN = """
import qcore

def annotate_nothing(model, config, filter_fn):
    return []

@qcore.hookimpl
def annotate_op(backend):
    return [qcore.Annotator(name="plain_" + backend, fn=annotate_nothing)]

@qcore.hookimpl(wrapper=True)
def lower_pattern(backend):
    CALLS.append(backend)
    records = yield
    return records

CALLS = []
"""


def test_hook_wrappers_and_tracing_see_every_call(site):
    make_plugin_dist(site, "qcore-wrap", "wrap", "qcore_toy_wrap", WRAPPER_PLUGIN)
    make_plugin_dist(site, "qcore-lower2", "lower2", "qcore_toy_lower2", LOWER_PLUGIN)
    pm = manager()
    traced = []
    undo = pm.pm.add_hookcall_monitoring(lambda name, impls, kwargs: traced.append((name, kwargs)), lambda *a: None)
    try:
        assert [p.name for p in pm.lowering_passes("toy")] == ["promote"]
        assert [a.name for a in pm.annotators("toy")] == ["plain_toy"]
    finally:
        undo()
    import qcore_toy_wrap

    assert qcore_toy_wrap.CALLS == ["toy"]  # the wrapper ran around the plugin's lower_pattern
    assert ("lower_pattern", {"backend": "toy"}) in traced and ("annotate_op", {"backend": "toy"}) in traced


LOWER_PLUGIN = """
import qcore

@qcore.hookimpl
def lower_pattern(backend):
    return [qcore.LoweringPass(name="promote", fn=lambda model, context: False)]
"""


def test_annotator_modes_are_checked():
    fn = lambda model, config, filter_fn: []  # noqa: E731
    with pytest.raises(ValueError, match="unknown modes \\['qat_only'\\]; allowed: 'dynamic', 'qat', 'static'"):
        qcore.Annotator(name="x", fn=fn, modes={"qat_only"})
    assert qcore.Annotator(name="x", fn=fn, modes={"qat"}).runs_in("qat")
    assert not qcore.Annotator(name="x", fn=fn, modes={"qat"}).runs_in("static")


def test_wrong_record_type_is_an_error_naming_the_plugin(site):
    source = "import qcore\n\n@qcore.hookimpl\ndef annotate_op(backend):\n    return ['not a record']\n"
    make_plugin_dist(site, "qcore-bad", "badrec", "qcore_toy_badrec", source)
    with pytest.raises(PluginError, match="plugin 'badrec' returned 'not a record' from annotate_op"):
        manager().annotators("toy")


def test_a_later_annotator_cannot_change_an_earlier_annotation(site):
    source = """
import torch, qcore
from qcore.annotation import annotate_output, mark_annotated
from qcore.observers import MinMaxObserver, HistogramObserver

INT8 = qcore.QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=MinMaxObserver)
UINT8 = qcore.QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=HistogramObserver)

def first(model, config, filter_fn):
    for n in model.graph.nodes:
        if n.op == "call_function":
            annotate_output(n, INT8)
            mark_annotated([n])
    return []

def second(model, config, filter_fn):
    for n in model.graph.nodes:
        if n.op == "call_function":
            annotate_output(n, UINT8)
    return []

@qcore.hookimpl
def annotate_op(backend):
    return [qcore.Annotator(name="first", fn=first, priority=2),
            qcore.Annotator(name="second", fn=second, priority=1)]
"""
    make_plugin_dist(site, "qcore-rude", "rude", "qcore_toy_rude", source)
    previous = set_plugin_manager(manager())
    try:

        class Toy(qcore.BackendQuantizer):
            backend = "toy"

        config = qcore.QuantizationConfig()
        gm = torch.export.export(torch.nn.ReLU(), (torch.randn(3),)).module()
        with pytest.raises(AnnotationConflictError, match=r"annotator 'second' of plugin 'rude' \(global\) changed the output spec of node 'relu'"):
            Toy().set_global(config).annotate(gm)
    finally:
        set_plugin_manager(previous)


def test_core_defaults_are_loaded_through_the_plugin_path():
    pm = QcorePluginManager(group=TEST_GROUP)
    infos = {i.name: i for i in pm.plugin_infos()}
    assert infos["qcore"].distribution == "qcore"
    assert "insert_observers" in infos["qcore"].hooks
