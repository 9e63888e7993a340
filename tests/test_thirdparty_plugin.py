"""Third-party plugins: the sigmoid example extends backends it does not own, the broken example fails safely.

Two ways to run:

* where the examples are installed (``tox -e example``), the tests run in this process against
  the real installed distributions;
* elsewhere (the default test run, which must not install the broken example), one test installs
  both examples into a throwaway venv and checks the same behaviour in subprocesses.

No test here changes qcore's or a backend's code: the example reaches the pipeline only through
its entry point.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import qcore
from qcore.errors import PluginError
from qcore.plugin_manager import PluginLoadWarning

REPO = Path(__file__).resolve().parents[1]
SIGMOID_EXAMPLE = REPO / "examples" / "thirdparty_plugin"
BROKEN_EXAMPLE = REPO / "examples" / "broken_plugin"
BROKEN_MESSAGE = "qcore-example-broken fails to import on purpose"


def entry_point_installed(name: str) -> bool:
    return any(ep.name == name for ep in importlib.metadata.entry_points(group="qcore"))


def module_available(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


needs_sigmoid_example = pytest.mark.skipif(
    not entry_point_installed("example_sigmoid"),
    reason="the example plugin is not installed here (pip install -e examples/thirdparty_plugin, or tox -e example)",
)
needs_broken_example = pytest.mark.skipif(
    not entry_point_installed("example_broken"),
    reason="the broken example is not installed here (tox -e example installs it)",
)


class LinearSigmoid(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


def make_quantizer(backend: str):
    if backend == "xnnpack":
        from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

        return XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


BACKEND_MODULES = {"xnnpack": "qcore_xnnpack", "onednn": "qcore_onednn_x86"}


def sigmoid_qdq(converted: torch.fx.GraphModule) -> tuple[str, str, tuple]:
    """(target of the sigmoid's input, target of its only user, that user's scale/zp/qmin/qmax)."""
    sigmoid = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
    (user,) = sigmoid.users
    return str(sigmoid.args[0].target), str(user.target), tuple(user.args[1:5])


def quantize_linear_sigmoid(backend: str) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    example = (torch.randn(4, 8),)
    prepared = qcore.prepare_pt2e(torch.export.export(LinearSigmoid(), example).module(), make_quantizer(backend))
    for _ in range(3):
        prepared(torch.randn(4, 8))
    return qcore.convert_pt2e(prepared)


# --------------------------------------------------------------------------- installed here
@pytest.fixture
def broken_blocked(monkeypatch):
    """Load plugins strictly, with the broken example (if installed) blocked."""
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "example_broken")


@needs_sigmoid_example
def test_sigmoid_plugin_is_discovered_through_its_entry_point(broken_blocked):
    infos = {info.name: info for info in qcore.get_plugin_manager().plugin_infos()}
    info = infos["example_sigmoid"]
    assert info.status == "loaded"
    assert info.distribution == "qcore-example-sigmoid"
    assert info.version == importlib.metadata.version("qcore-example-sigmoid")
    assert info.hooks == ("annotate_op",)
    for backend in ("xnnpack", "onednn"):
        names = [(a.plugin, a.name) for a in qcore.get_plugin_manager().annotators(backend)]
        assert ("example_sigmoid", "example_sigmoid") in names


@needs_sigmoid_example
@pytest.mark.parametrize("backend", ["xnnpack", "onednn"])
def test_sigmoid_gets_fixed_qparams_qdq_after_convert(broken_blocked, backend):
    if not module_available(BACKEND_MODULES[backend]):
        pytest.skip(f"the {backend} plugin is not installed")
    source, user, qparams = sigmoid_qdq(quantize_linear_sigmoid(backend))
    assert "dequantize_per_tensor" in source
    assert "quantize_per_tensor" in user
    assert qparams == (1.0 / 256.0, -128, -128, 127)


@needs_broken_example
def test_broken_plugin_warns_naming_plugin_distribution_and_error(monkeypatch):
    monkeypatch.delenv("QCORE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("QCORE_BLOCK_PLUGINS", raising=False)
    manager = qcore.get_plugin_manager()
    with pytest.warns(PluginLoadWarning) as caught:
        infos = {info.name: info for info in manager.plugin_infos()}
    message = next(str(w.message) for w in caught if "example_broken" in str(w.message))
    assert "'example_broken' from distribution 'qcore-example-broken'" in message
    assert f"RuntimeError: {BROKEN_MESSAGE}" in message
    assert infos["example_broken"].status == "failed"
    assert BROKEN_MESSAGE in infos["example_broken"].error
    others = [info for name, info in infos.items() if name != "example_broken"]
    assert others and all(info.status == "loaded" for info in others)


@needs_broken_example
def test_broken_plugin_is_failed_in_qcore_plugins_json_and_others_still_work(monkeypatch, capsys):
    from qcore.app.cli import main

    monkeypatch.delenv("QCORE_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("QCORE_BLOCK_PLUGINS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        assert main(["plugins", "--json"]) == 0
        rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
        assert rows["example_broken"]["status"] == "failed"
        assert rows["example_broken"]["distribution"] == "qcore-example-broken"
        assert BROKEN_MESSAGE in rows["example_broken"]["error"]
        if module_available("qcore_xnnpack"):
            assert rows["xnnpack"]["backends"] == ["xnnpack"]
            if entry_point_installed("example_sigmoid"):
                _, user, qparams = sigmoid_qdq(quantize_linear_sigmoid("xnnpack"))
                assert qparams == (1.0 / 256.0, -128, -128, 127)


@needs_broken_example
def test_strict_mode_makes_the_broken_plugin_a_plugin_error(monkeypatch):
    monkeypatch.setenv("QCORE_STRICT_PLUGINS", "1")
    monkeypatch.delenv("QCORE_BLOCK_PLUGINS", raising=False)
    with pytest.raises(PluginError, match=r"'example_broken' from distribution 'qcore-example-broken'.*QCORE_STRICT_PLUGINS"):
        qcore.get_plugin_manager().plugin_infos()


# --------------------------------------------------------------------------- throwaway venv
VENV_SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, os, warnings
    import torch, qcore
    from qcore.app.cli import main
    from qcore.errors import PluginError
    from qcore.plugin_manager import PluginLoadWarning, set_plugin_manager

    result = {}
    import qcore_example_sigmoid
    result["sigmoid_module"] = qcore_example_sigmoid.__file__

    # lenient: the broken plugin is skipped with a warning and listed as failed
    os.environ.pop("QCORE_STRICT_PLUGINS", None)
    os.environ.pop("QCORE_BLOCK_PLUGINS", None)
    set_plugin_manager(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qcore.get_plugin_manager().plugin_infos()
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result["plugins_exit"] = main(["plugins", "--json"])
    result["plugins"] = json.loads(out.getvalue())

    # strict: the same plugin is a PluginError, and a one-line error from the command
    os.environ["QCORE_STRICT_PLUGINS"] = "1"
    set_plugin_manager(None)
    try:
        qcore.get_plugin_manager().plugin_infos()
        result["strict_error"] = None
    except PluginError as exc:
        result["strict_error"] = str(exc)
    set_plugin_manager(None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result["strict_cli_exit"] = main(["plugins"])
    result["strict_cli_stderr"] = err.getvalue()

    # the sigmoid example in the pipeline (strict, the broken one blocked)
    os.environ["QCORE_BLOCK_PLUGINS"] = "example_broken"
    set_plugin_manager(None)
    try:
        from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config
    except ImportError:
        result["sigmoid"] = None
    else:
        class LinearSigmoid(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)
            def forward(self, x):
                return torch.sigmoid(self.fc(x))

        torch.manual_seed(0)
        example = (torch.randn(4, 8),)
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
        prepared = qcore.prepare_pt2e(torch.export.export(LinearSigmoid(), example).module(), quantizer)
        prepared(*example)
        converted = qcore.convert_pt2e(prepared)
        sigmoid = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.sigmoid.default)
        (user,) = sigmoid.users
        result["sigmoid"] = [str(sigmoid.args[0].target), str(user.target), list(user.args[1:5])]
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(
    entry_point_installed("example_sigmoid") or entry_point_installed("example_broken"),
    reason="the examples are installed here: the in-process tests above cover them",
)
def test_examples_installed_in_a_throwaway_venv(child_venv, tmp_path):
    python = child_venv("examples")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         str(SIGMOID_EXAMPLE), str(BROKEN_EXAMPLE)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run([str(python), "-c", VENV_SCRIPT], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "site-packages" in result["sigmoid_module"]  # installed, not imported from the source tree

    # lenient
    (warning,) = [w for w in result["warnings"] if "example_broken" in w]
    assert "qcore plugin 'example_broken' from distribution 'qcore-example-broken' failed to load" in warning
    assert f"RuntimeError: {BROKEN_MESSAGE}" in warning
    assert result["plugins_exit"] == 0
    rows = {row["name"]: row for row in result["plugins"]}
    assert rows["example_sigmoid"]["status"] == "loaded"
    assert rows["example_sigmoid"]["distribution"] == "qcore-example-sigmoid"
    assert rows["example_sigmoid"]["hooks"] == ["annotate_op"]
    assert rows["example_broken"]["status"] == "failed"
    assert rows["example_broken"]["distribution"] == "qcore-example-broken"
    assert rows["example_broken"]["error"] == f"RuntimeError: {BROKEN_MESSAGE} (it shows how qcore handles a broken plugin)"
    assert all(row["status"] == "loaded" for name, row in rows.items() if name != "example_broken")

    # strict
    assert "'example_broken' from distribution 'qcore-example-broken'" in result["strict_error"]
    assert "QCORE_STRICT_PLUGINS" in result["strict_error"]
    assert result["strict_cli_exit"] == 1
    assert result["strict_cli_stderr"].startswith("qcore: error: qcore plugin 'example_broken'")

    # the pipeline uses the sigmoid annotator
    if result["sigmoid"] is not None:
        source, user, qparams = result["sigmoid"]
        assert "dequantize_per_tensor" in source and "quantize_per_tensor" in user
        assert qparams == [1.0 / 256.0, -128, -128, 127]
