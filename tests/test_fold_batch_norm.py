"""PTQ folds eval-mode batch norm into the conv before annotation, as the old flow did."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.testing import requires_backend
from qcore.passes.fold_batch_norm import fold_batch_norm
from qcore.graph_copy import copy_graph_module

aten = torch.ops.aten


def conv_bn(conv: torch.nn.Module, bn: torch.nn.Module, relu: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [conv, bn] + ([torch.nn.ReLU()] if relu else [])
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


CASES = [
    ("conv2d", lambda: conv_bn(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), (2, 3, 8, 8)),
    ("conv2d_no_bias", lambda: conv_bn(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)), (2, 3, 8, 8)),
    ("conv1d", lambda: conv_bn(torch.nn.Conv1d(3, 4, 3), torch.nn.BatchNorm1d(4), relu=False), (2, 3, 10)),
    ("conv_transpose2d", lambda: conv_bn(torch.nn.ConvTranspose2d(3, 4, 3, groups=1), torch.nn.BatchNorm2d(4)), (2, 3, 5, 5)),
    ("grouped_transpose", lambda: conv_bn(torch.nn.ConvTranspose2d(4, 6, 3, groups=2), torch.nn.BatchNorm2d(6)), (2, 4, 5, 5)),
    ("conv3d", lambda: conv_bn(torch.nn.Conv3d(3, 4, 3), torch.nn.BatchNorm3d(4)), (2, 3, 5, 5, 5)),
    ("conv_transpose3d", lambda: conv_bn(torch.nn.ConvTranspose3d(4, 6, 3, groups=2), torch.nn.BatchNorm3d(6)), (2, 4, 4, 4, 4)),
    ("linear", lambda: conv_bn(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)), (6, 5)),
    ("linear_no_bias", lambda: conv_bn(torch.nn.Linear(5, 4, bias=False), torch.nn.BatchNorm1d(4), relu=False), (6, 5)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_folding_keeps_the_float_math_and_removes_batch_norm(name, make, shape):
    model = make()
    x = torch.randn(*shape)
    exported = torch.export.export(model, (x,)).module()
    copy, _ = copy_graph_module(exported)
    assert fold_batch_norm(copy)
    copy.recompile()
    assert not any(n.target is aten.batch_norm.default for n in copy.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x), rtol=1e-5, atol=1e-5)
    assert any(n.target is aten.batch_norm.default for n in exported.graph.nodes)  # the input is untouched


@requires_backend("onednn")
def test_prepare_pt2e_folds_and_annotates_conv_relu():
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    model = CASES[0][1]()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = torch.export.export(model, (x,)).module()
    prepared = qcore.prepare_pt2e(exported, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    assert not any(n.target is aten.batch_norm.default for n in prepared.graph.nodes)
    prepared(x)
    converted = qcore.convert_pt2e(prepared)
    q_ops = [n for n in converted.graph.nodes if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default]
    assert len(q_ops) == 2  # input, relu output: conv -> relu is one partition
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 0.1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_train_mode_batch_norm_is_not_folded():
    model = CASES[0][1]().train()
    exported = torch.export.export(model, (torch.randn(2, 3, 8, 8),)).module()
    copy, _ = copy_graph_module(exported)
    assert not fold_batch_norm(copy)


def test_a_weight_read_twice_is_not_folded():
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x)

    exported = torch.export.export(Shared().eval(), (torch.randn(1, 3, 4, 4),)).module()
    copy, _ = copy_graph_module(exported)
    before = str(copy.graph)
    fold_batch_norm(copy)
    x = torch.randn(1, 3, 4, 4)
    copy.recompile()
    with torch.no_grad():
        torch.testing.assert_close(copy(x), exported(x), rtol=1e-5, atol=1e-5)
    assert before.count("batch_norm") == str(copy.graph).count("batch_norm")


def test_linear_batch_norm_above_2d_is_not_folded_and_says_why():
    """BatchNorm1d on [N, C, L] normalises axis 1; the linear maps the last axis: folding is wrong."""
    model = conv_bn(torch.nn.Linear(5, 5), torch.nn.BatchNorm1d(3), relu=False)  # x: [N, 3, 5]
    x = torch.randn(2, 3, 5)
    exported = torch.export.export(model, (x,)).module()
    copy, _ = copy_graph_module(exported)
    with pytest.warns(UserWarning, match=r"batch norm '.*' after linear 'linear' is not folded: the linear's input is not 2-D"):
        assert not fold_batch_norm(copy)
    assert sum(n.target is aten.batch_norm.default for n in copy.graph.nodes) == 1
    copy.recompile()
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


@requires_backend("xnnpack")
def test_prepare_pt2e_folds_linear_batch_norm_and_quantizes_linear_relu():
    from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config

    model = conv_bn(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6))
    x = torch.randn(16, 8)
    exported = torch.export.export(model, (x,)).module()
    prepared = qcore.prepare_pt2e(exported, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    assert not any(n.target is aten.batch_norm.default for n in prepared.graph.nodes)
    prepared(x)
    converted = qcore.convert_pt2e(prepared)
    q_ops = [n for n in converted.graph.nodes if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default]
    assert len(q_ops) == 2  # input, relu output: linear -> relu is one partition once BN is folded
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() < 0.1
