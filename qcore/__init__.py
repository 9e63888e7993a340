"""qcore: post-training and quantization-aware quantization for PyTorch, with plugin backends.

Importing qcore loads no plugin and no backend: plugins load on first use.

>>> import qcore
>>> qcore.hookimpl.project_name
'qcore'
"""

from __future__ import annotations

__version__ = "0.1.0"

from qcore.hookspecs import hookimpl
from qcore.records import Algorithm, AlgorithmContext, Annotator, Backend, LoweringContext, LoweringPass
from qcore.spec import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationConfig,
    QuantizationSpec,
    QuantizationSpecBase,
    SharedQuantizationSpec,
)
from qcore.quantizer import BackendQuantizer, ComposableQuantizer, Quantizer
from qcore.pipeline import (
    compile,
    convert_pt2e,
    lower,
    move_exported_model_to_eval,
    move_exported_model_to_train,
    prepare_pt2e,
    prepare_qat_pt2e,
)
from qcore.passes.train_eval import allow_exported_model_train_eval
from qcore.plugin_manager import get_plugin_manager
from qcore.app.quantize import load, quantize
from qcore.accuracy import sensitivity

__all__ = [
    "__version__",
    "hookimpl",
    "Algorithm",
    "AlgorithmContext",
    "Annotator",
    "Backend",
    "LoweringContext",
    "LoweringPass",
    "QuantizationSpecBase",
    "QuantizationSpec",
    "FixedQParamsQuantizationSpec",
    "SharedQuantizationSpec",
    "DerivedQuantizationSpec",
    "QuantizationAnnotation",
    "QuantizationConfig",
    "Quantizer",
    "BackendQuantizer",
    "ComposableQuantizer",
    "prepare_pt2e",
    "prepare_qat_pt2e",
    "convert_pt2e",
    "move_exported_model_to_eval",
    "move_exported_model_to_train",
    "allow_exported_model_train_eval",
    "lower",
    "compile",
    "get_plugin_manager",
    "quantize",
    "load",
    "sensitivity",
    "distributed",
]


def __getattr__(name: str) -> object:
    """``qcore.distributed`` is imported on first use (it is not needed in one process)."""
    if name == "distributed":
        import importlib

        return importlib.import_module("qcore.distributed")
    raise AttributeError(f"module 'qcore' has no attribute {name!r}")
