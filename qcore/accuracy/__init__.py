"""Accuracy beyond plain calibration: sensitivity, SmoothQuant, bias correction, an accuracy target.

* :func:`sensitivity` ranks the quantized partitions by what keeping each one float gains;
* :func:`smooth_quant` migrates activation outliers into the following weights (a graph pass
  for the pt2e verbs; ``qcore.quantize(smooth_quant=alpha)``);
* :func:`correct_bias` moves each quantized conv/linear's mean output error into its bias
  (``qcore.quantize(bias_correction=True)``);
* ``qcore.quantize(min_sqnr_db=..., accuracy_fn=..., max_drop=...)`` keeps the fewest
  partitions float that reach a target (:mod:`qcore.accuracy.accuracy_target`).

>>> import qcore.accuracy
>>> qcore.accuracy.SensitivityRecord.__name__
'SensitivityRecord'
"""

from __future__ import annotations

from qcore.accuracy.accuracy_target import AccuracyTargetError, AccuracyTargetWarning
from qcore.accuracy.bias_correction import correct_bias
from qcore.accuracy.sensitivity import SensitivityRecord, sensitivity
from qcore.accuracy.smooth_quant import smooth_quant

__all__ = ["SensitivityRecord", "sensitivity", "smooth_quant", "correct_bias", "AccuracyTargetError", "AccuracyTargetWarning"]
