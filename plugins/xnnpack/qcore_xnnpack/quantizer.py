"""``XNNPACKQuantizer``: int8 annotation for ExecuTorch's XNNPACK delegate.

Same API as the old ``torch.ao`` XNNPACKQuantizer; its annotators come from every plugin that
serves the backend ``"xnnpack"`` (this plugin's recipe first of all), with precedence
module name > module type > operator type > global, and ``None`` at a scope keeping it float.

>>> import qcore
>>> from qcore_xnnpack import XNNPACKQuantizer, get_symmetric_quantization_config
>>> quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
>>> quantizer.backend
'xnnpack'

Typical use (``qcore.prepare_pt2e`` and ``qcore.convert_pt2e`` keep the old signatures)::

    exported = torch.export.export(model.eval(), example_inputs).module()
    prepared = qcore.prepare_pt2e(exported, quantizer)
    prepared(*example_inputs)                      # calibrate
    converted = qcore.convert_pt2e(prepared)
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

import qcore
from qcore.spec import QuantizationConfig

__all__ = ["XNNPACKQuantizer", "OperatorConfig"]

OperatorPatternType = list


class OperatorConfig(NamedTuple):
    """A config and the op patterns (module classes / functions, in data-flow order) it covers."""

    config: QuantizationConfig
    operators: list


def _supported_symmetric_operators() -> dict[str, list[OperatorPatternType]]:
    return {
        "conv2d": [
            [torch.nn.Conv2d, torch.nn.ReLU],
            [torch.nn.Conv2d, F.relu],
            [F.conv2d, torch.nn.ReLU],
            [F.conv2d, F.relu],
        ],
        "linear": [[torch.nn.Linear], [F.linear]],
        "add": [[torch.add]],
        "max_pool2d": [[torch.nn.MaxPool2d], [F.max_pool2d]],
        "adaptive_avg_pool2d": [[torch.nn.AdaptiveAvgPool2d], [F.adaptive_avg_pool2d]],
    }


def _supported_config_and_operators() -> list[OperatorConfig]:
    from qcore_xnnpack.config import get_symmetric_quantization_config

    entries = []
    for config in (
        get_symmetric_quantization_config(),
        get_symmetric_quantization_config(is_qat=True),
        get_symmetric_quantization_config(is_per_channel=True),
        get_symmetric_quantization_config(is_per_channel=True, is_qat=True),
    ):
        entries.extend(OperatorConfig(config, patterns) for patterns in _supported_symmetric_operators().values())
    return entries


class _LazyClassAttribute:
    """A class attribute computed on first access (the configs need ``qcore.observers``)."""

    def __init__(self, compute: Any) -> None:
        self.compute = compute
        self.value: Optional[list] = None

    def __get__(self, instance: Any, owner: type) -> list:
        if self.value is None:
            self.value = self.compute()
        return self.value


class XNNPACKQuantizer(qcore.BackendQuantizer):
    """Annotates an exported model for int8 inference through XNNPACK.

    Setters: ``set_global``, ``set_operator_type``, ``set_module_type``, ``set_module_name``
    (each returns the quantizer; a ``None`` config keeps that scope in float).
    """

    backend: ClassVar[str] = "xnnpack"

    #: For each of the 4 standard configs, one OperatorConfig per op family (20 entries).
    supported_config_and_operators: ClassVar[list] = _LazyClassAttribute(_supported_config_and_operators)  # type: ignore[assignment]

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Scalar operands of floating-point add/mul become tensor constants (on a copy: ``model`` is not
        changed); integer arithmetic (position ids, indices) keeps its scalars."""
        from qcore.graph_copy import copy_graph_module
        from qcore_xnnpack.convert_scalars_to_attrs import convert_scalars_to_attrs, has_scalar_operands

        if not has_scalar_operands(model):
            return model
        model, _ = copy_graph_module(model, copy_tensors=False)
        convert_scalars_to_attrs(model)
        return model

    def validate(self, model: GraphModule) -> None:
        """XNNPACK accepts every annotation this recipe makes: nothing to check."""

    @classmethod
    def default_config(cls, is_qat: bool = False) -> QuantizationConfig:
        """The backend's default config (what ``qcore.quantize`` uses when given none)."""
        from qcore_xnnpack.config import get_symmetric_quantization_config

        return get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)

    @classmethod
    def get_supported_quantization_configs(cls) -> list[QuantizationConfig]:
        """The distinct configs of ``supported_config_and_operators`` (4)."""
        configs: list[QuantizationConfig] = []
        for config, _ in cls.supported_config_and_operators:
            if not any(config == seen for seen in configs):
                configs.append(config)
        return configs

    @classmethod
    def get_supported_operator_for_quantization_config(cls, quantization_config: Optional[QuantizationConfig]) -> list[OperatorPatternType]:
        """The op patterns of the first entry whose config equals ``quantization_config``.

        ``None`` gives every entry's patterns concatenated. Configs compare by value (observer
        class and arguments), so a freshly built config finds its entry (the seed compared
        observer constructors by identity and returned ``[]``).
        """
        if quantization_config is None:
            return [pattern for _, patterns in cls.supported_config_and_operators for pattern in patterns]
        for config, patterns in cls.supported_config_and_operators:
            if config == quantization_config:
                return list(patterns)
        return []

    @classmethod
    def get_supported_operators(cls) -> list[OperatorConfig]:
        """Every (config, op patterns) entry."""
        return list(cls.supported_config_and_operators)
