"""The x86 annotators, one module per op family, as ``qcore.Annotator`` records.

qcore runs them longest pattern first (conv -> bn -> add -> relu before conv -> add before
conv), then the observer-sharing ops once every compute pattern is claimed.

The observer-sharing ops come in two recipes (``SHARING_RECIPES``); the plugin contributes
both and ``X86InductorQuantizer(sharing_recipe=...)`` runs one of them:

* ``"torchao"`` (the default), torchao's "int8-in-int8-out" recipe (``int8_in_int8_out``):
  max_pool2d, cat, avg_pool2d, adaptive_avg_pool2d and flatten after a quantized pattern share
  one observer on their input and output (``conv -> q -> dq -> avg_pool2d -> q -> dq``);
* ``"sqnr"``, qcore's own: max_pool2d quantized with the qparams of its output's observer, cat
  and flatten/view/reshape shared, average pools left float (``avg_pool2d.keep_avg_pool2d_float``
  marks them, so reports give the reason) for their consumer to quantize with its own observer.

A matmul of two activations (``matmul.py``) is not in the default recipe: the quantizer's global
scope leaves it out, a ``torch.matmul`` (or module) scope quantizes it.
"""

from __future__ import annotations

import qcore

from qcore_onednn_x86.annotators import (
    addmm,
    avg_pool2d,
    cat,
    conv,
    conv_bn,
    int8_in_int8_out,
    linear,
    matmul,
    max_pool2d,
    mul,
    reshape,
)

STATIC = {"static", "qat"}
WITH_DYNAMIC = {"static", "dynamic", "qat"}
QAT_ONLY = {"qat"}

#: recipe -> the names of its observer-sharing annotators (every other annotator runs in both)
SHARING_RECIPES: dict[str, tuple[str, ...]] = {
    "torchao": ("x86_int8_in_int8_out",),
    "sqnr": ("x86_max_pool2d", "x86_cat", "x86_reshape", "x86_avg_pool2d_float"),
}


#: qcore's extension, run only with ``X86InductorQuantizer(conv1d_conv3d=True)``: torchao's x86
#: recipe quantizes conv1d only when a relu follows, and no conv3d
CONV1D_CONV3D_ANNOTATORS: tuple[str, ...] = ("x86_conv1d_unary", "x86_conv1d_conv3d")


def x86_annotators() -> list:
    """Every annotator of the x86 recipe, both sharing recipes included (qcore orders them:
    fused patterns first; the quantizer keeps the sharing annotators of its recipe)."""

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
        record("x86_conv1d_relu", conv.annotate_conv1d_relu, ("conv1d", "relu")),
        record("x86_conv1d_unary", conv.annotate_conv1d_unary, ("conv1d", "unary")),
        record("x86_conv1d_conv3d", conv.annotate_conv1d_conv3d, ("conv1d|conv3d",)),
        record("x86_linear_add_relu", linear.annotate_linear_add_relu, ("linear", "add", "relu"), WITH_DYNAMIC),
        record("x86_linear_add", linear.annotate_linear_add, ("linear", "add"), WITH_DYNAMIC),
        record("x86_linear_unary", linear.annotate_linear_unary, ("linear", "unary"), WITH_DYNAMIC),
        record("x86_linear", linear.annotate_linear, ("linear",), WITH_DYNAMIC),
        record("x86_addmm", addmm.annotate_addmm, ("addmm",), WITH_DYNAMIC),
        record("x86_mul", mul.annotate_mul, ("mul",), WITH_DYNAMIC),
        record("x86_matmul", matmul.annotate_matmul, ("matmul",), WITH_DYNAMIC),
        record("x86_int8_in_int8_out", int8_in_int8_out.annotate_int8_in_int8_out, ("int8_in_int8_out",), shares_input=True),
        record("x86_max_pool2d", max_pool2d.annotate_max_pool2d, ("max_pool2d",), shares_input=True),
        record("x86_cat", cat.annotate_cat, ("cat",), shares_input=True),
        record("x86_reshape", reshape.annotate_reshape, ("reshape",), shares_input=True),
        record("x86_avg_pool2d_float", avg_pool2d.keep_avg_pool2d_float, ("avg_pool2d",)),
    ]
