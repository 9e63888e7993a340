"""qcore.compile(converted, backend="onednn"): lowered by qcore's passes, compiled by Inductor,
without touching global Inductor settings or a user's custom passes."""

from __future__ import annotations

import pytest
import torch

import qcore

from _onednn_helpers import largest_activation_scale, quantize


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1)
        return self.fc(y)


EXAMPLE = (torch.randn(2, 3, 8, 8),)
MLP_EXAMPLE = (torch.randn(4, 16),)


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


#: The counters torch's own x86 quantization passes (torch._inductor.fx_passes.quantization,
#: registered by Inductor's freezing passes) bump when they fuse or prepack a q/dq pattern:
#: qcore's lowering must leave them nothing to match. (Its ``q*_lower_count`` patterns are left
#: out: each matches one already-fused ``onednn.q*_pointwise`` call and hands it to Inductor's IR,
#: as Inductor's default lowering of that op would.)
TORCH_X86_QUANTIZATION_COUNTERS = (
    "dequant_promotion_matcher_count",
    "qcat_matcher_count",
    "qconv_weight_prepack_matcher_count",
    "qlinear_weight_prepack_matcher_count",
    "qmaxpool2d_matcher_count",
    "qreshape_matcher_count",
    "quant_lift_up_count",
    "woq_matcher_count",
)


def torch_x86_quantization_matches() -> dict:
    from torch._dynamo.utils import counters

    return {name: counters["inductor"][name] for name in TORCH_X86_QUANTIZATION_COUNTERS if counters["inductor"][name]}


def inductor_settings() -> dict:
    from torch._inductor import config

    return {
        "freezing": config.freezing,
        "post_grad_custom_pre_pass": config.post_grad_custom_pre_pass,
        "post_grad_custom_post_pass": config.post_grad_custom_post_pass,
        "joint_custom_pre_pass": config.joint_custom_pre_pass,
    }


def test_onednn_backend_declares_freezing_gemm_autotuning_and_the_cpp_wrapper_as_its_compile_options():
    record = qcore.get_plugin_manager().get_backend("onednn")
    assert record.compile_options == {
        "freezing": True,
        "max_autotune": True,
        "autotune_num_choices_displayed": 0,
        "max_autotune_report_choices_stats": False,
        "cpp_wrapper": True,
    }


def test_unknown_inductor_setting_is_refused_before_compiling():
    converted = quantize(mlp(), MLP_EXAMPLE, batches=0)
    with pytest.raises(ValueError, match=r"unknown Inductor settings \['no_such_setting'\].*freezing"):
        qcore.compile(converted, backend="onednn", example_inputs=MLP_EXAMPLE, options={"no_such_setting": 1})


@pytest.mark.parametrize("mode", [None, "max-autotune-no-cudagraphs"])
def test_settings_dynamo_reads_are_set_per_call_and_the_rest_go_to_inductor_as_options(monkeypatch, mode):
    seen = {}

    def recording_compile(model, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", recording_compile)
    converted = quantize(mlp(), MLP_EXAMPLE, batches=0)
    extra = {} if mode is None else {"mode": mode}
    compiled = qcore.compile(converted, backend="onednn", options={"max_autotune": False}, dynamic=False, **extra)
    assert compiled.settings == {"freezing": True}  # Dynamo reads it while tracing: set per call
    expected = {
        "max_autotune": False, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
        "cpp_wrapper": True,
    }
    if mode is not None:  # torch.compile refuses a mode beside options: the mode's settings are merged in, ours win
        expected = {**torch._inductor.list_mode_options(mode), **expected}
    assert seen == {"dynamic": False, "options": expected}


def test_compile_matches_the_lowered_model_and_leaves_global_inductor_settings_alone():
    """The one fast-enough compile test: a small MLP, compiled twice, with a user's custom pass."""
    from torch._inductor import config

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    seen = []

    def user_pass(graph):
        seen.append(len(graph.nodes))

    converted = quantize(mlp(), MLP_EXAMPLE)
    with config.patch(post_grad_custom_post_pass=user_pass):
        before = inductor_settings()
        first = qcore.compile(converted, backend="onednn", example_inputs=MLP_EXAMPLE)
        assert inductor_settings() == before
        second = qcore.compile(converted, backend="onednn", example_inputs=MLP_EXAMPLE)  # idempotent
        assert inductor_settings() == before
        assert config.post_grad_custom_post_pass is user_pass
        assert seen, "the user's custom Inductor pass still runs inside qcore.compile"
        with torch.no_grad():
            expected = first.lowered(*MLP_EXAMPLE)
        for compiled in (first, second):
            actual = compiled(*MLP_EXAMPLE)
            assert not actual.requires_grad
            assert (expected - actual).abs().max() <= largest_activation_scale(converted) * 1.01 + 1e-5
        assert inductor_settings() == before
        # the short paths: autograd already off (no no_grad context), freezing already on (no switch)
        with torch.no_grad():
            assert torch.equal(first(*MLP_EXAMPLE), actual)
        assert torch.is_grad_enabled()
        with config.patch(freezing=True):
            assert torch.equal(first(*MLP_EXAMPLE), actual)
            assert config.freezing is True
        assert inductor_settings() == before
    assert first.lowered.meta["qcore_lowered"]["counters"]["qlinear_weight_prepack_matcher_count"] == 2
    # Inductor's freezing passes ran torch's x86 quantization patterns too: they matched nothing
    assert torch_x86_quantization_matches() == {}
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_cnn_matches_the_lowered_eager_model_within_one_quantization_step():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    converted = quantize(SmallNet(), EXAMPLE)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=EXAMPLE)
    with torch.no_grad():
        expected = compiled.lowered(*EXAMPLE)
    actual = compiled(*EXAMPLE)
    assert (expected - actual).abs().max() <= largest_activation_scale(converted) * 1.01 + 1e-5
    # the compiled model is lowered: no q/dq ops reach Inductor from the convs and linears
    assert compiled.lowered.meta["qcore_lowered"]["counters"]["qconv2d_weight_prepack_matcher_count"] == 1
    assert torch_x86_quantization_matches() == {}
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_model_called_with_grad_enabled_does_not_recompile_without_freezing():
    from torch._inductor import config

    torch._dynamo.reset()
    converted = quantize(mlp(), MLP_EXAMPLE)
    compiled = qcore.compile(converted, backend="onednn", example_inputs=MLP_EXAMPLE)
    assert torch.is_grad_enabled() and config.freezing is False
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            compiled(*MLP_EXAMPLE)
    torch._dynamo.reset()


def test_importing_qcore_does_not_import_inductor():
    import subprocess
    import sys

    code = "import sys, qcore; qcore.compile; print('torch._inductor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
