"""The x86 annotators, one module per op family, as ``qcore.Annotator`` records.

qcore runs them longest pattern first (conv -> bn -> add -> relu before conv -> add before
conv), then the observer-sharing ops (max_pool2d, cat, reshapes) once every compute pattern is
claimed.

Average pools are deliberately left float (``avg_pool2d.keep_avg_pool2d_float`` marks them, so
reports give the reason): the consumer of the average quantizes it with its own observer.
"""

from __future__ import annotations

import qcore

from qcore_onednn_x86.annotators import addmm, avg_pool2d, cat, conv, conv_bn, linear, max_pool2d, mul, reshape

STATIC = {"static", "qat"}
WITH_DYNAMIC = {"static", "dynamic", "qat"}
QAT_ONLY = {"qat"}


def x86_annotators() -> list:
    """Every annotator of the x86 recipe (qcore orders them: fused patterns first)."""

    def record(name, fn, pattern, modes=STATIC, shares_input=False):
        # the pattern's length is the priority: fused patterns claim their nodes first
        return qcore.Annotator(name=name, fn=fn, priority=len(pattern), modes=modes, shares_input=shares_input)

    return [
        record("x86_qat_conv2d_bn_add_relu", conv_bn.annotate_qat_conv2d_bn_add_relu, ("conv2d", "batch_norm", "add", "relu"), QAT_ONLY),
        record("x86_qat_conv2d_bn_add", conv_bn.annotate_qat_conv2d_bn_add, ("conv2d", "batch_norm", "add"), QAT_ONLY),
        record("x86_qat_conv2d_bn_unary", conv_bn.annotate_qat_conv2d_bn_unary, ("conv2d", "batch_norm", "unary"), QAT_ONLY),
        record("x86_qat_conv2d_bn", conv_bn.annotate_qat_conv2d_bn, ("conv2d", "batch_norm"), QAT_ONLY),
        record("x86_conv2d_add_relu", conv.annotate_conv2d_add_relu, ("conv2d", "add", "relu")),
        record("x86_conv2d_add", conv.annotate_conv2d_add, ("conv2d", "add")),
        record("x86_conv2d_unary", conv.annotate_conv2d_unary, ("conv2d", "unary")),
        record("x86_conv2d", conv.annotate_conv2d, ("conv2d",)),
        record("x86_conv1d_unary", conv.annotate_conv1d_unary, ("conv1d", "unary")),
        record("x86_conv1d_conv3d", conv.annotate_conv1d_conv3d, ("conv1d|conv3d",)),
        record("x86_linear_add_relu", linear.annotate_linear_add_relu, ("linear", "add", "relu"), WITH_DYNAMIC),
        record("x86_linear_add", linear.annotate_linear_add, ("linear", "add"), WITH_DYNAMIC),
        record("x86_linear_unary", linear.annotate_linear_unary, ("linear", "unary"), WITH_DYNAMIC),
        record("x86_linear", linear.annotate_linear, ("linear",), WITH_DYNAMIC),
        record("x86_addmm", addmm.annotate_addmm, ("addmm",), WITH_DYNAMIC),
        record("x86_mul", mul.annotate_mul, ("mul",)),
        record("x86_max_pool2d", max_pool2d.annotate_max_pool2d, ("max_pool2d",), shares_input=True),
        record("x86_cat", cat.annotate_cat, ("cat",), shares_input=True),
        record("x86_reshape", reshape.annotate_reshape, ("reshape",), shares_input=True),
        record("x86_avg_pool2d_float", avg_pool2d.keep_avg_pool2d_float, ("avg_pool2d",)),
    ]
