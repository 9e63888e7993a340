"""qcore-example-sigmoid: a third-party qcore plugin that quantizes ``aten.sigmoid``.

It adds one annotator to backends it does not own (xnnpack and onednn) through the
``annotate_op`` hook; nothing in qcore or in those backends changes.

>>> from qcore_example_sigmoid.annotate_sigmoid import SIGMOID_OUTPUT_SPEC
>>> SIGMOID_OUTPUT_SPEC.scale, SIGMOID_OUTPUT_SPEC.zero_point
(0.00390625, -128)
"""
