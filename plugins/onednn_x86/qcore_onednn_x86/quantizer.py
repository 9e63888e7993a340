"""``X86InductorQuantizer``: the quantizer for the ``onednn`` backend.

Its annotators come from every plugin serving the backend ``"onednn"`` (this plugin's x86
recipe first of all): uint8 affine per-tensor activations, int8 symmetric per-channel weights.

>>> from qcore_onednn_x86 import X86InductorQuantizer, get_default_x86_inductor_quantization_config
>>> q = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
>>> q.backend
'onednn'
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar, Optional

import torch

import qcore

aten = torch.ops.aten


def _module_function_to_operator() -> dict:
    """The module classes and functions torchao's x86 quantizer configures, and the aten
    operator each stands for (``set_module_type_qconfig(torch.nn.Linear, c)`` configures every
    ``aten.linear``, wherever it is, as ``set_function_type_qconfig(F.linear, c)`` does)."""
    F = torch.nn.functional
    pairs = (
        ((torch.nn.Conv1d, F.conv1d), aten.conv1d.default),
        ((torch.nn.Conv2d, F.conv2d), aten.conv2d.default),
        ((torch.nn.Linear, F.linear), aten.linear.default),
        ((torch.nn.MaxPool2d, F.max_pool2d), aten.max_pool2d.default),
        ((torch.cat,), aten.cat.default),
        ((torch.nn.AvgPool2d, F.avg_pool2d), aten.avg_pool2d.default),
        ((torch.nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d), aten.adaptive_avg_pool2d.default),
        ((torch.flatten,), aten.flatten.using_ints),
        ((torch.matmul,), aten.matmul.default),
        ((torch.mul,), aten.mul.Tensor),
    )
    return {key: op for keys, op in pairs for key in keys}


def _is_ours(fn: Callable) -> bool:
    """True for a function of this plugin (another plugin may name an annotator alike)."""
    return getattr(fn, "__module__", "").startswith("qcore_onednn_x86.")


class X86InductorQuantizer(qcore.BackendQuantizer):
    """Annotates an exported model for x86 int8 inference through oneDNN.

    torchao's configuration API, with its semantics: ``set_global``,
    ``set_module_name_qconfig(name, config)`` (ops inside that submodule),
    ``set_module_type_qconfig(torch.nn.Linear, config)`` and
    ``set_function_type_qconfig(torch.nn.functional.linear, config)`` (every op of the aten
    type the class or function stands for, see :data:`MODULE_FUNCTION_TO_OPERATOR`),
    ``get_global_quantization_config()``. Precedence: module name over module/function type
    over global; a None config keeps its scope float. All configs must agree on QAT and on
    dynamic activations: a config that mixes them with the ones already set is skipped with a
    warning, as in torchao. qcore's own setters (``set_operator_type``, ``set_module_type``
    for ops inside modules of a class, ``set_module_name``) work beside them.

    ``sharing_recipe`` says how the ops that run on their input's int8 data are annotated:

    * ``"torchao"`` (default): torchao's "int8-in-int8-out" recipe. max_pool2d, cat,
      avg_pool2d, adaptive_avg_pool2d and flatten whose inputs are all outputs of quantized
      patterns get one observer on their input and output (``conv -> q -> dq -> avg_pool2d ->
      q -> dq -> flatten -> q -> dq -> linear``), the q/dq counts torchao gives; the lowering
      runs them on uint8.
    * ``"sqnr"``: qcore's recipe, tuned for accuracy. max_pool2d's input takes the qparams of
      an observer on its output only (it sees the values the pool lets through), cat and
      flatten/view/reshape share their input's observer, and average pools stay float so that
      their consumer quantizes the (narrower-ranged) average with its own observer. On the bench
      ResNet-style CNN (``bench/bench_onednn.py``'s ``cnn``, full 8-bit config, its calibration
      data): 41.0 dB of SQNR against float with 22 quantizes, against 40.1 dB with 24 for
      ``"torchao"`` (torchao itself: 41.0 dB, 21, as it does not quantize the pools of that
      model's functional relus); on a CPU without VNNI (pair-safe ranges) 38.4 against 37.5 dB.

    ``conv1d_conv3d=True`` (qcore's extension, off by default as in torchao, whose recipe
    quantizes a conv1d only when a relu follows and no conv3d): also quantize a lone conv1d or
    conv3d and a conv1d with any oneDNN unary post-op (gelu, silu, hardswish, ...); the lowering
    runs a 1-D conv as a 2-D oneDNN conv with its post-ops. A quantized conv1d front end costs
    accuracy on speech models (wav2vec2's conv1d + GroupNorm + GELU feature extractor), so it is
    an opt-in: ``qcore.quantize(..., quantizer_options={"conv1d_conv3d": True})``.

    >>> X86InductorQuantizer(sharing_recipe="sqnr").sharing_recipe
    'sqnr'
    >>> import torch
    >>> from qcore_onednn_x86 import get_default_x86_inductor_quantization_config as default
    >>> q = X86InductorQuantizer().set_global(default()).set_module_type_qconfig(torch.nn.Linear, None)
    >>> q.operator_type_config[torch.ops.aten.linear.default] is None
    True
    """

    backend: ClassVar[str] = "onednn"
    #: class or function -> the aten operator it configures (torchao's table, plus nn.Conv1d)
    MODULE_FUNCTION_TO_OPERATOR: ClassVar[dict] = _module_function_to_operator()
    module_function_to_aten_operator_type: ClassVar[dict] = MODULE_FUNCTION_TO_OPERATOR  # torchao's name
    #: the values ``sharing_recipe`` takes
    SHARING_RECIPES: ClassVar[tuple[str, ...]] = ("torchao", "sqnr")

    def __init__(self, sharing_recipe: str = "torchao", conv1d_conv3d: bool = False) -> None:
        super().__init__()
        if not isinstance(sharing_recipe, str) or sharing_recipe not in self.SHARING_RECIPES:
            raise ValueError(
                f"X86InductorQuantizer: unknown sharing_recipe {sharing_recipe!r}; "
                f"allowed: {', '.join(repr(r) for r in self.SHARING_RECIPES)}"
            )
        if not isinstance(conv1d_conv3d, bool):
            raise TypeError(f"X86InductorQuantizer: conv1d_conv3d must be True or False, got {conv1d_conv3d!r}")
        self.sharing_recipe = sharing_recipe
        self.conv1d_conv3d = conv1d_conv3d

    def annotators(self) -> list:
        """Every annotator for the backend, but of this plugin's observer-sharing annotators only
        those of ``sharing_recipe`` (see ``qcore_onednn_x86.annotators.SHARING_RECIPES``)."""
        from qcore_onednn_x86.annotators import CONV1D_CONV3D_ANNOTATORS, SHARING_RECIPES

        left_out = {name for recipe, names in SHARING_RECIPES.items() if recipe != self.sharing_recipe for name in names}
        if not self.conv1d_conv3d:
            left_out.update(CONV1D_CONV3D_ANNOTATORS)
        return [a for a in super().annotators() if not (a.name in left_out and _is_ours(a.fn))]

    def annotate(self, model: "torch.fx.GraphModule") -> "torch.fx.GraphModule":
        """Claim the ops of every scope configured None as float first, then run the recipe.

        As in torchao, an op a None scope keeps float is claimed (not merely skipped), so the
        observer-sharing ops after it (flatten, cat, ...) do not look through it to a quantized
        producer: ``conv -> max_pool2d (None) -> flatten -> linear`` quantizes flatten's output for
        the linear only, not its input.
        """
        self._claim_ops_of_float_scopes(model)
        return super().annotate(model)

    def _claim_ops_of_float_scopes(self, model: "torch.fx.GraphModule") -> None:
        from qcore.annotation import calls_operator_filter, is_annotated, keep_float, mark_annotated
        from qcore.coverage import QUANTIZABLE_OPS

        from qcore_onednn_x86.annotators.common import SHARING_OPS

        scopes = self.scopes()[:-1]  # narrowest first; the global scope claims nothing
        if not any(config is None for _, config, _ in scopes):
            return
        candidates = set(QUANTIZABLE_OPS) | set(SHARING_OPS)
        own_op = {f"operator type {op}": calls_operator_filter(op) for op in self.operator_type_config}
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in candidates or is_annotated(node):
                continue
            for label, config, accepts in scopes:
                if label in own_op and not own_op[label](node):
                    continue  # an operator scope owns only its own op's nodes
                if accepts(node):
                    if config is None:
                        keep_float(node, f"the quantizer's {label} scope has config None")
                        mark_annotated([node])
                    break

    def scopes(self) -> list:
        """qcore's scopes, narrowest first; the global one covers torchao's default recipe only (a
        matmul of two activations is quantized where a narrower scope, ``torch.matmul``, asks)."""
        from qcore_onednn_x86.annotators.matmul import outside_default_recipe

        *narrower, (label, config, accept) = super().scopes()
        return [*narrower, (label, config, outside_default_recipe(accept))]

    # -- torchao's configuration API -----------------------------------------------------
    def set_global(self, quantization_config: Optional[qcore.QuantizationConfig]) -> "X86InductorQuantizer":
        if self._mixes_modes(quantization_config):
            warnings.warn("Skip the global quantization config.", stacklevel=2)
            return self
        super().set_global(quantization_config)
        return self

    def get_global_quantization_config(self) -> Optional[qcore.QuantizationConfig]:
        """The global config (a warning when none was set, as in torchao)."""
        if not isinstance(self.global_config, qcore.QuantizationConfig):
            warnings.warn(
                "The global_config for X86InductorQuantizer is not set: call set_global(config) first", stacklevel=2
            )
        return self.global_config

    def set_module_name_qconfig(self, module_name: str, quantization_config: Optional[qcore.QuantizationConfig]) -> "X86InductorQuantizer":
        """Ops inside the submodule at ``module_name`` (``"blocks.sub"``) use this config (None: float)."""
        if not self._mixes_modes(quantization_config):
            self.set_module_name(module_name, quantization_config)
        return self

    def set_module_type_qconfig(self, module_type: type, quantization_config: Optional[qcore.QuantizationConfig]) -> "X86InductorQuantizer":
        """Every op of the aten type ``module_type`` stands for (``torch.nn.Linear``: every linear)."""
        return self._set_type_qconfig("module", module_type, quantization_config)

    def set_function_type_qconfig(self, function_type: Callable, quantization_config: Optional[qcore.QuantizationConfig]) -> "X86InductorQuantizer":
        """Every op of the aten type ``function_type`` stands for (``torch.matmul``, ``F.linear``, ...)."""
        return self._set_type_qconfig("function", function_type, quantization_config)

    def _set_type_qconfig(self, kind: str, key: Any, quantization_config: Optional[qcore.QuantizationConfig]) -> "X86InductorQuantizer":
        operator = self.MODULE_FUNCTION_TO_OPERATOR.get(key)
        if operator is None:
            known = sorted({getattr(k, "__qualname__", str(k)) for k in self.MODULE_FUNCTION_TO_OPERATOR})
            warnings.warn(
                f"{kind}: unable to customize the quantization config for {key!r} with X86InductorQuantizer; "
                f"it configures: {', '.join(known)}",
                stacklevel=3,
            )
            return self
        if not self._mixes_modes(quantization_config):
            self.set_operator_type(operator, quantization_config)
        return self

    def _mixes_modes(self, config: Optional[qcore.QuantizationConfig]) -> bool:
        """True (with torchao's warning) if ``config`` mixes QAT/PTQ or static/dynamic with the configs already set."""
        if config is None:
            return False
        configs = [self.global_config, *self.module_name_config.values(), *self.operator_type_config.values(), *self.module_type_config.values()]
        configs = [c for c in configs if c is not None]
        mixed = False
        if any(c.is_qat != config.is_qat for c in configs):
            warnings.warn("Mixed QAT and Non-QAT quantization config is not supported.", stacklevel=3)
            mixed = True
        dynamic = getattr(config.input_activation, "is_dynamic", None)
        if config.input_activation is not None and any(
            c.input_activation is not None and c.input_activation.is_dynamic != dynamic for c in configs
        ):
            warnings.warn("Mixed dynamic and static quantization config is not supported.", stacklevel=3)
            mixed = True
        return mixed

    @classmethod
    def default_config(cls, is_qat: bool = False, target: Optional[str] = None) -> "qcore.QuantizationConfig":
        """The backend's default config (what ``qcore.quantize`` uses when given none), exact on
        ``target`` (one of ``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx2"``; None: this CPU).

        >>> X86InductorQuantizer.default_config(target="avx2").weight.quant_max
        91
        """
        from qcore_onednn_x86.config import get_default_x86_inductor_quantization_config

        return get_default_x86_inductor_quantization_config(is_qat=is_qat, target=target)
