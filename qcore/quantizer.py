"""Quantizers: the objects ``prepare_pt2e`` asks to annotate a model.

``BackendQuantizer`` is the base of every qcore backend's quantizer: it keeps the configs a
user sets per scope and runs the annotators that plugins contribute for its backend through
the ``annotate_op`` hook, with precedence module name > module type > operator type > global
(``None`` at a scope keeps that scope in float).

>>> import torch
>>> from qcore.quantizer import BackendQuantizer
>>> class ToyQuantizer(BackendQuantizer):
...     backend = "toy"
>>> q = ToyQuantizer().set_module_type(torch.nn.Linear, None)
>>> q.module_type_config[torch.nn.Linear] is None
True
"""

from __future__ import annotations

import abc
import functools
from typing import Any, ClassVar, Optional

from torch.fx import GraphModule

from qcore.annotation import (
    FilterFn,
    calls_operator_filter,
    module_name_filter,
    module_type_filter,
    not_any_filter,
    operator_type_filter,
    run_guarded,
)
from qcore.spec import QuantizationConfig

__all__ = ["Quantizer", "BackendQuantizer", "ComposableQuantizer", "config_mode"]


class Quantizer(abc.ABC):
    """The interface ``prepare_pt2e`` needs: transform, annotate, validate."""

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Rewrite the graph before annotation (default: unchanged)."""
        return model

    @abc.abstractmethod
    def annotate(self, model: GraphModule) -> GraphModule:
        """Store ``QuantizationAnnotation`` objects in ``node.meta`` of the nodes to quantize."""

    @abc.abstractmethod
    def validate(self, model: GraphModule) -> None:
        """Raise if the annotated model cannot be quantized for this quantizer's target."""

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
        """Called after observers are created and before they are inserted (default: nothing)."""


def config_mode(config: QuantizationConfig) -> str:
    """"dynamic", "qat" or "static": which annotators a config runs (a dynamic QAT config is
    dynamic: only the dynamic annotators apply)."""
    act = config.input_activation
    if act is not None and getattr(act, "is_dynamic", False):
        return "dynamic"
    if config.is_qat:
        return "qat"
    return "static"


def _check_config(config: Any, where: str) -> None:
    if config is not None and not isinstance(config, QuantizationConfig):
        raise TypeError(f"{where}: expected a qcore.QuantizationConfig or None, got {config!r}")


class BackendQuantizer(Quantizer):
    """A quantizer whose annotators come from plugins through the ``annotate_op`` hook."""

    backend: ClassVar[str] = ""

    def __init__(self) -> None:
        self.global_config: Optional[QuantizationConfig] = None
        self.operator_type_config: dict[Any, Optional[QuantizationConfig]] = {}
        self.module_type_config: dict[type, Optional[QuantizationConfig]] = {}
        self.module_name_config: dict[str, Optional[QuantizationConfig]] = {}

    def set_global(self, quantization_config: Optional[QuantizationConfig]) -> "BackendQuantizer":
        """The config for every op no narrower scope claims."""
        _check_config(quantization_config, "set_global")
        self.global_config = quantization_config
        return self

    def set_operator_type(self, operator_type: Any, quantization_config: Optional[QuantizationConfig]) -> "BackendQuantizer":
        """The config for ops of one aten type (``torch.ops.aten.conv2d.default`` or the packet)."""
        _check_config(quantization_config, "set_operator_type")
        self.operator_type_config[operator_type] = quantization_config
        return self

    def set_module_type(self, module_type: type, quantization_config: Optional[QuantizationConfig]) -> "BackendQuantizer":
        """The config for ops inside modules of class ``module_type`` (None: keep them float)."""
        if not isinstance(module_type, type):
            raise TypeError(f"set_module_type: expected a module class such as torch.nn.Linear, got {module_type!r}")
        _check_config(quantization_config, "set_module_type")
        self.module_type_config[module_type] = quantization_config
        return self

    def set_module_name(self, module_name: str, quantization_config: Optional[QuantizationConfig]) -> "BackendQuantizer":
        """The config for ops inside the submodule at ``module_name`` (None: keep them float)."""
        if not isinstance(module_name, str):
            raise TypeError(f"set_module_name: expected a dotted submodule path such as 'layer1.0', got {module_name!r}")
        _check_config(quantization_config, "set_module_name")
        self.module_name_config[module_name] = quantization_config
        return self

    def scopes(self) -> list[tuple[str, Optional[QuantizationConfig], FilterFn]]:
        """(label, config, filter) for every scope, narrowest first."""
        module_filters: list[FilterFn] = []
        scopes: list[tuple[str, Optional[QuantizationConfig], FilterFn]] = []
        for name, config in self.module_name_config.items():
            f = module_name_filter(name)
            module_filters.append(f)
            scopes.append((f"module name {name!r}", config, f))
        for cls, config in self.module_type_config.items():
            f = module_type_filter(cls)
            module_filters.append(f)
            scopes.append((f"module type {cls.__name__}", config, f))
        outside_modules = not_any_filter(list(module_filters))
        op_filters: list[FilterFn] = []
        for op, config in self.operator_type_config.items():
            op_filters.append(calls_operator_filter(op))
            scopes.append((f"operator type {op}", config, _both(operator_type_filter(op), outside_modules)))
        scopes.append(("global", self.global_config, not_any_filter(module_filters + op_filters)))
        return scopes

    def annotators(self) -> list:
        """The ``Annotator`` records :meth:`annotate` runs, in run order: by default every one the
        plugins contribute for this backend. A backend's quantizer may override it to select
        among them (the x86 quantizer keeps the observer-sharing annotators of one recipe)."""
        from qcore.plugin_manager import get_plugin_manager

        return get_plugin_manager().annotators(self.backend)

    def annotate(self, model: GraphModule) -> GraphModule:
        """Run :meth:`annotators` over every scope."""
        annotators = self.annotators()
        for label, config, filter_fn in self.scopes():
            if config is None:
                continue
            mode = config_mode(config)
            for annotator in annotators:
                if not annotator.runs_in(mode):
                    continue
                who = f"annotator {annotator.name!r} of plugin {annotator.plugin!r} ({label})"
                run_guarded(who, model, functools.partial(annotator.fn, model, config, filter_fn))
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check by default."""


def _both(first: FilterFn, second: FilterFn) -> FilterFn:
    def accept(node: Any) -> bool:
        return first(node) and second(node)

    return accept


class ComposableQuantizer(Quantizer):
    """Several quantizers on one model, in order; a later one may only add annotations.

    >>> ComposableQuantizer([]).quantizers
    []
    """

    def __init__(self, quantizers: list) -> None:
        self.quantizers = list(quantizers)

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        for quantizer in self.quantizers:
            model = quantizer.transform_for_annotation(model)
        return model

    def annotate(self, model: GraphModule) -> GraphModule:
        for index, quantizer in enumerate(self.quantizers):
            who = f"quantizer {index} ({type(quantizer).__name__}) of the ComposableQuantizer"
            run_guarded(who, model, functools.partial(quantizer.annotate, model))
        return model

    def validate(self, model: GraphModule) -> None:
        for quantizer in self.quantizers:
            quantizer.validate(model)

    def prepare_obs_or_fq_callback(self, model: GraphModule, edge_or_node_to_obs_or_fq: dict) -> None:
        for quantizer in self.quantizers:
            callback = getattr(quantizer, "prepare_obs_or_fq_callback", None)
            if callback is not None:
                callback(model, edge_or_node_to_obs_or_fq)
