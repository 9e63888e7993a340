"""Random model graphs for fuzzing quantization backends, as ``hypothesis`` strategies.

``random_graphs()`` draws a :class:`RandomGraph`: 3-12 blocks of the kinds real models are made
of (conv/bn/activation, grouped, dilated, transposed, 1-D and 3-D convs, residual adds,
squeeze-excite, cat, pooling, upsampling, chunk, flatten to a sequence, self-attention,
LayerNorm, GLU, linear + BatchNorm1d, embeddings, shared submodules and linears, ...; the
grammar is :data:`BLOCKS`). Each block knows the shape and dtype it accepts and makes (light
operator specs, as NNSmith's), so every drawn graph is valid. A case carries the eval-mode
module (initialised deterministically from its seed), example inputs, calibration batches
(bounded values: nothing overflows) and ``to_source()``, a self-contained Python file that
rebuilds the same module and inputs: paste a shrunk failing case into a regression test.
Shrinking gives fewer blocks, simpler blocks and fewer channels.

A plugin fuzzes its backend with it (``fuzz_settings`` reads ``QCORE_FUZZ_PROFILE``: the
derandomized default profile, or ``fuzz`` for thousands of examples)::

    import qcore, torch
    from hypothesis import given, note
    from qcore.testing.random_graphs import fuzz_settings, random_graphs

    @fuzz_settings(max_examples=20)
    @given(graph=random_graphs(max_blocks=8))
    def test_mybackend_quantizes_every_graph(graph):
        note(graph.to_source())                  # printed with the shrunk failing example
        result = qcore.quantize(graph.build(), graph.example_inputs, backend="mybackend",
                                calibration=graph.calibration, dynamic_shapes=graph.dynamic_shapes,
                                measure_latency=False)
        assert torch.isfinite(result.converted(*graph.example_inputs)).all()

Finding a graph (``hypothesis.find`` shrinks it to a minimal one):

>>> from hypothesis import find, settings
>>> images = random_graphs(blocks=["conv_bn_act", "cat"], sequence=False, tokens=False, vector=False)
>>> graph = find(images, lambda g: "cat" in g.block_names, settings=settings(database=None, derandomize=True))
>>> len(graph.blocks), "cat" in graph.block_names, graph.input.kind
(3, True, 'image')
>>> model = graph.build()
>>> model(*graph.example_inputs).shape == (graph.batch, *graph.output_spec.shape)
True
>>> namespace = {}
>>> exec(graph.to_source(), namespace)
>>> import torch
>>> torch.equal(namespace["make_model"]()(*namespace["make_inputs"]()), model(*graph.example_inputs))
True
"""

from __future__ import annotations

import hashlib
import linecache
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = [
    "ACTIVATIONS",
    "BLOCKS",
    "Block",
    "BlockCall",
    "EdgeDifference",
    "FUZZ_PROFILE_ENV",
    "KnownDifference",
    "PROPAGATING_OPS",
    "ProgramPair",
    "QuantizedEdge",
    "RandomGraph",
    "TensorSpec",
    "assert_state_unchanged",
    "distillation_train_fn",
    "edge_differences",
    "explain_differences",
    "fuzz_settings",
    "largest_activation_scale",
    "load_fuzz_profile",
    "quantized_edges",
    "random_graphs",
    "register_profiles",
    "selected_profile",
    "snapshot_state",
]

# --------------------------------------------------------------------------- hypothesis profiles
#: The environment variable that picks the profile: unset (or ``qcore``) for the default, ``fuzz``.
FUZZ_PROFILE_ENV = "QCORE_FUZZ_PROFILE"
DEFAULT_PROFILE = "qcore"
FUZZ_PROFILE = "fuzz"
#: Examples per test in the ``fuzz`` profile (``QCORE_FUZZ_MAX_EXAMPLES`` overrides).
FUZZ_EXAMPLES = 2000
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def register_profiles() -> None:
    """Register the two hypothesis profiles (idempotent; done on import).

    * ``qcore`` (default): 30 examples, derandomized (the same examples every run, so CI is
      deterministic), no deadline, no example database (nothing written).
    * ``fuzz``: :data:`FUZZ_EXAMPLES` examples (``QCORE_FUZZ_MAX_EXAMPLES`` overrides), random
      (replay a run with ``pytest --hypothesis-seed=N``), no deadline, no database, prints the
      ``@reproduce_failure`` blob of a failure.
    """
    settings.register_profile(
        DEFAULT_PROFILE, max_examples=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=_HEALTH, print_blob=False,
    )
    settings.register_profile(
        FUZZ_PROFILE, max_examples=int(os.environ.get("QCORE_FUZZ_MAX_EXAMPLES", FUZZ_EXAMPLES)), deadline=None,
        derandomize=False, database=None, suppress_health_check=_HEALTH, print_blob=True,
    )


register_profiles()


def selected_profile() -> str:
    """The profile ``QCORE_FUZZ_PROFILE`` names (``qcore`` when unset)."""
    name = os.environ.get(FUZZ_PROFILE_ENV, "").strip() or DEFAULT_PROFILE
    if name not in (DEFAULT_PROFILE, FUZZ_PROFILE):
        raise ValueError(f"{FUZZ_PROFILE_ENV}={name!r}: expected {DEFAULT_PROFILE!r} or {FUZZ_PROFILE!r}")
    return name


def load_fuzz_profile() -> str:
    """Load the selected profile as hypothesis's global settings; return its name."""
    name = selected_profile()
    settings.load_profile(name)
    return name


def fuzz_settings(max_examples: Optional[int] = None, **overrides: Any) -> settings:
    """A ``@settings`` decorator from the selected profile; ``max_examples`` (and any other
    ``overrides``) apply in the default profile only: the ``fuzz`` profile's count always wins."""
    name = selected_profile()
    if name == FUZZ_PROFILE:
        return settings(settings.get_profile(name))
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    return settings(settings.get_profile(name), **overrides)


# --------------------------------------------------------------------------- shapes and dtypes
@dataclass(frozen=True)
class TensorSpec:
    """A value flowing between blocks: its kind, its per-sample shape (no batch dimension), its dtype.

    Kinds: ``image`` (C, H, W), ``sequence`` (L, D), ``vector`` (F,), ``tokens`` (L,) int64
    indices below ``vocab``.
    """

    kind: str
    shape: tuple
    dtype: torch.dtype = torch.float32
    vocab: int = 0

    @property
    def channels(self) -> int:
        """The feature dimension blocks change: C of an image, D of a sequence, F of a vector."""
        return self.shape[0] if self.kind == "image" else self.shape[-1]

    def __str__(self) -> str:
        text = f"{self.kind}{tuple(self.shape)}"
        return text + (f" int64<{self.vocab}" if self.kind == "tokens" else "")


def _image(c: int, h: int, w: int) -> TensorSpec:
    return TensorSpec("image", (c, h, w))


def _with_channels(spec: TensorSpec, channels: int) -> TensorSpec:
    if spec.kind == "image":
        return TensorSpec("image", (channels, *spec.shape[1:]))
    return TensorSpec(spec.kind, (*spec.shape[:-1], channels))


@dataclass(frozen=True)
class Limits:
    max_channels: int = 16
    max_spatial: int = 16
    max_length: int = 64
    max_features: int = 128


# --------------------------------------------------------------------------- code emission
class _Emitter:
    """Collects the ``__init__`` and ``forward`` lines of the generated module."""

    def __init__(self) -> None:
        self.init: list[str] = []
        self.forward: list[str] = []
        self._count = 0

    def attr(self, name: str, expr: str) -> str:
        self.init.append(f"self.{name} = {expr}")
        return f"self.{name}"

    def fresh(self) -> str:
        self._count += 1
        return f"x{self._count}"

    def let(self, expr: str) -> str:
        var = self.fresh()
        self.forward.append(f"{var} = {expr}")
        return var

    def stmt(self, line: str) -> None:
        self.forward.append(line)


#: Activations, as the expression applied to a variable.
ACTIVATIONS: dict[str, str] = {
    "relu": "F.relu({})",
    "relu6": "F.relu6({})",
    "hardtanh": "F.hardtanh({})",
    "sigmoid": "torch.sigmoid({})",
    "gelu": "F.gelu({})",
    "silu": "F.silu({})",
    "hardswish": "F.hardswish({})",
}
_ACT_CHOICES = ("none", *ACTIVATIONS)


def _act(e: _Emitter, x: str, act: str) -> str:
    return x if act == "none" else e.let(ACTIVATIONS[act].format(x))


def _feature_dim(spec: TensorSpec) -> int:
    return 1 if spec.kind == "image" else -1


# --------------------------------------------------------------------------- the grammar
Draw = Callable[[st.SearchStrategy], Any]


@dataclass(frozen=True)
class Block:
    """One production of the grammar.

    ``kinds``: the value kinds it accepts; ``applies(spec, limits)``: whether it can take this
    value; ``draw(draw, spec, limits)``: its parameters (a dict of ints, bools and strings);
    ``emit(e, prefix, x, spec, params)``: writes its code, returns (output variable, output spec).
    ``to_kind``: the kind it turns the value into (None: the same kind).
    """

    name: str
    kinds: tuple
    draw: Callable[[Draw, TensorSpec, Limits], dict]
    emit: Callable[[_Emitter, str, str, TensorSpec, dict], tuple]
    applies: Callable[[TensorSpec, Limits], bool] = lambda spec, limits: True
    to_kind: Optional[str] = None
    doc: str = ""

    def accepts(self, spec: TensorSpec, limits: Limits) -> bool:
        return spec.kind in self.kinds and self.applies(spec, limits)


def _channels(draw: Draw, limits: Limits, low: int = 1) -> int:
    return draw(st.integers(low, max(low, limits.max_channels)))


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# conv2d [+ bn] [+ activation]
def _draw_conv(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {
        "out": _channels(draw, limits),
        "kernel": draw(st.sampled_from([1, 3])),
        "stride": draw(st.sampled_from([1, 2])),
        "bias": draw(st.booleans()),
        "bn": draw(st.booleans()),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
    }


def _emit_conv(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    k, s = q["kernel"], q["stride"]
    e.attr(f"{p}conv", f"torch.nn.Conv2d({c}, {q['out']}, {k}, stride={s}, padding={k // 2}, bias={q['bias']})")
    y = e.let(f"self.{p}conv({x})")
    if q["bn"]:
        e.attr(f"{p}bn", f"torch.nn.BatchNorm2d({q['out']})")
        y = e.let(f"self.{p}bn({y})")
    y = _act(e, y, q["act"])
    return y, _image(q["out"], _conv_out(h, k, s, k // 2), _conv_out(w, k, s, k // 2))


# grouped / depthwise / dilated conv2d
def _draw_grouped(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    c = spec.shape[0]
    groups = draw(st.sampled_from([d for d in _divisors(c) if d > 1]))
    return {
        "groups": groups,
        "multiplier": draw(st.integers(1, max(1, limits.max_channels // groups))),
        "dilation": draw(st.sampled_from([1, 2])),
        "bn": draw(st.booleans()),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
    }


def _emit_grouped(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    out, d = q["groups"] * q["multiplier"], q["dilation"]
    e.attr(f"{p}conv", f"torch.nn.Conv2d({c}, {out}, 3, padding={d}, dilation={d}, groups={q['groups']})")
    y = e.let(f"self.{p}conv({x})")
    if q["bn"]:
        e.attr(f"{p}bn", f"torch.nn.BatchNorm2d({out})")
        y = e.let(f"self.{p}bn({y})")
    return _act(e, y, q["act"]), _image(out, h, w)


# conv_transpose2d (same size, or 2x up)
def _draw_transposed(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    _, h, w = spec.shape
    variants = ["same"] + (["up2"] if max(h, w) * 2 <= 2 * limits.max_spatial else [])
    return {
        "variant": draw(st.sampled_from(variants)),
        "out": _channels(draw, limits),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
    }


def _emit_transposed(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    if q["variant"] == "up2":
        e.attr(f"{p}deconv", f"torch.nn.ConvTranspose2d({c}, {q['out']}, 2, stride=2)")
        h, w = 2 * h, 2 * w
    else:
        e.attr(f"{p}deconv", f"torch.nn.ConvTranspose2d({c}, {q['out']}, 3, padding=1)")
    y = e.let(f"self.{p}deconv({x})")
    return _act(e, y, q["act"]), _image(q["out"], h, w)


# residual: conv3x3 [+ bn] [+ act], + x, [relu]
def _draw_residual(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {
        "bn": draw(st.booleans()),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
        "skip_first": draw(st.booleans()),
        "post_relu": draw(st.booleans()),
    }


def _emit_residual(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c = spec.shape[0]
    e.attr(f"{p}conv", f"torch.nn.Conv2d({c}, {c}, 3, padding=1)")
    y = e.let(f"self.{p}conv({x})")
    if q["bn"]:
        e.attr(f"{p}bn", f"torch.nn.BatchNorm2d({c})")
        y = e.let(f"self.{p}bn({y})")
    y = _act(e, y, q["act"])
    y = e.let(f"{x} + {y}" if q["skip_first"] else f"{y} + {x}")
    if q["post_relu"]:
        y = e.let(f"F.relu({y})")
    return y, spec


# squeeze-excite: x * sigmoid(fc(relu(fc(pool(x)))))
def _draw_se(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {
        "hidden": draw(st.integers(1, max(1, spec.shape[0]))),
        "style": draw(st.sampled_from(["conv", "linear"])),
        "gate_first": draw(st.booleans()),
    }


def _emit_se(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, hid = spec.shape[0], q["hidden"]
    if q["style"] == "conv":
        e.attr(f"{p}reduce", f"torch.nn.Conv2d({c}, {hid}, 1)")
        e.attr(f"{p}expand", f"torch.nn.Conv2d({hid}, {c}, 1)")
        s = e.let(f"F.adaptive_avg_pool2d({x}, 1)")
        s = e.let(f"F.relu(self.{p}reduce({s}))")
        s = e.let(f"torch.sigmoid(self.{p}expand({s}))")
    else:
        e.attr(f"{p}reduce", f"torch.nn.Linear({c}, {hid})")
        e.attr(f"{p}expand", f"torch.nn.Linear({hid}, {c})")
        s = e.let(f"{x}.mean((2, 3))")
        s = e.let(f"F.relu(self.{p}reduce({s}))")
        s = e.let(f"torch.sigmoid(self.{p}expand({s})).reshape(-1, {c}, 1, 1)")
    return e.let(f"{s} * {x}" if q["gate_first"] else f"{x} * {s}"), spec


# cat: of the input twice, of the input and a branch, of two branches, along the length
def _cat_variants(spec: TensorSpec, limits: Limits) -> list:
    variants = ["twice", "skip", "branches"]
    if spec.kind == "sequence" and 2 * spec.shape[0] <= limits.max_length:
        variants.append("length")
    return variants


def _draw_cat(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    variant = draw(st.sampled_from(_cat_variants(spec, limits)))
    q: dict = {"variant": variant}
    if variant in ("skip", "branches"):
        q["a"] = _channels(draw, limits)
        q["act"] = draw(st.sampled_from(_ACT_CHOICES))
    if variant == "branches":
        q["b"] = _channels(draw, limits)
    return q


def _branch(e: _Emitter, name: str, x: str, spec: TensorSpec, out: int, kernel: int = 1) -> str:
    if spec.kind == "image":
        e.attr(name, f"torch.nn.Conv2d({spec.shape[0]}, {out}, {kernel}, padding={kernel // 2})")
    else:
        e.attr(name, f"torch.nn.Linear({spec.shape[-1]}, {out})")
    return e.let(f"self.{name}({x})")


def _emit_cat(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    d, c = _feature_dim(spec), spec.channels
    variant = q["variant"]
    if variant == "twice":
        return e.let(f"torch.cat([{x}, {x}], dim={d})"), _with_channels(spec, 2 * c)
    if variant == "length":
        length, dim = spec.shape
        return e.let(f"torch.cat([{x}, {x}], dim=1)"), TensorSpec("sequence", (2 * length, dim))
    a = _act(e, _branch(e, f"{p}a", x, spec, q["a"]), q["act"])
    if variant == "skip":
        return e.let(f"torch.cat([{x}, {a}], dim={d})"), _with_channels(spec, c + q["a"])
    b = _branch(e, f"{p}b", x, spec, q["b"], kernel=3)
    return e.let(f"torch.cat([{a}, {b}], dim={d})"), _with_channels(spec, q["a"] + q["b"])


# pooling
def _pool_variants(spec: TensorSpec) -> list:
    _, h, w = spec.shape
    variants = ["max3s2", "adaptive_avg", "adaptive_max"]
    if min(h, w) >= 2:
        variants = ["max2", "avg2"] + variants
    return variants


def _draw_pool(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    variant = draw(st.sampled_from(_pool_variants(spec)))
    q: dict = {"variant": variant}
    if variant.startswith("adaptive"):
        q["size"] = draw(st.integers(1, max(1, min(spec.shape[1:]) // 2)))
    return q


def _emit_pool(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    v = q["variant"]
    if v == "max2":
        return e.let(f"F.max_pool2d({x}, 2)"), _image(c, h // 2, w // 2)
    if v == "avg2":
        return e.let(f"F.avg_pool2d({x}, 2)"), _image(c, h // 2, w // 2)
    if v == "max3s2":
        return e.let(f"F.max_pool2d({x}, 3, stride=2, padding=1)"), _image(c, _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1))
    fn = "adaptive_avg_pool2d" if v == "adaptive_avg" else "adaptive_max_pool2d"
    return e.let(f"F.{fn}({x}, {q['size']})"), _image(c, q["size"], q["size"])


# upsampling (nearest)
def _draw_upsample(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"by": draw(st.sampled_from(["scale", "size"]))}


def _emit_upsample(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    if q["by"] == "scale":
        y = e.let(f"F.interpolate({x}, scale_factor=2, mode=\"nearest\")")
    else:
        y = e.let(f"F.interpolate({x}, size=({2 * h}, {2 * w}), mode=\"nearest\")")
    return y, _image(c, 2 * h, 2 * w)


# chunk in two along the features
def _draw_chunk(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"combine": draw(st.sampled_from(["add", "gate", "swap"]))}


def _emit_chunk(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    d = _feature_dim(spec)
    a, b = e.fresh(), e.fresh()
    e.stmt(f"{a}, {b} = torch.chunk({x}, 2, dim={d})")
    half = _with_channels(spec, spec.channels // 2)
    if q["combine"] == "add":
        return e.let(f"{a} + {b}"), half
    if q["combine"] == "gate":
        return e.let(f"{a} * torch.sigmoid({b})"), half
    return e.let(f"torch.cat([{b}, {a}], dim={d})"), spec


# conv3d over an image made a one- or two-deep volume
def _draw_conv3d(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {
        "volume": draw(st.sampled_from(["unsqueeze", "stack"])),
        "out": _channels(draw, limits),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
    }


def _emit_conv3d(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    if q["volume"] == "unsqueeze":
        v = e.let(f"{x}.unsqueeze(2)")
        e.attr(f"{p}conv", f"torch.nn.Conv3d({c}, {q['out']}, (1, 3, 3), padding=(0, 1, 1))")
    else:
        v = e.let(f"torch.stack([{x}, F.relu({x})], dim=2)")
        e.attr(f"{p}conv", f"torch.nn.Conv3d({c}, {q['out']}, (2, 3, 3), padding=(0, 1, 1))")
    y = e.let(f"self.{p}conv({v}).squeeze(2)")
    return _act(e, y, q["act"]), _image(q["out"], h, w)


# a submodule called twice
def _draw_shared_block(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"use": draw(st.sampled_from(["chain", "sum"])), "bn": draw(st.booleans()) if spec.kind == "image" else False}


def _emit_shared_block(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c = spec.channels
    if spec.kind == "image":
        layers = [f"torch.nn.Conv2d({c}, {c}, 3, padding=1)"] + ([f"torch.nn.BatchNorm2d({c})"] if q["bn"] else [])
    else:
        layers = [f"torch.nn.Linear({c}, {c})"]
    e.attr(f"{p}shared", f"torch.nn.Sequential({', '.join(layers + ['torch.nn.ReLU()'])})")
    if q["use"] == "chain":
        return e.let(f"self.{p}shared(self.{p}shared({x}))"), spec
    a = e.let(f"self.{p}shared({x})")
    b = e.let(f"self.{p}shared(torch.sigmoid({x}))")
    return e.let(f"{a} + {b}"), spec


# image -> sequence
def _draw_to_sequence(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"how": draw(st.sampled_from(["flatten_transpose", "permute_reshape"]))}


def _emit_to_sequence(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c, h, w = spec.shape
    if q["how"] == "flatten_transpose":
        y = e.let(f"{x}.flatten(2).transpose(1, 2)")
    else:
        y = e.let(f"{x}.permute(0, 2, 3, 1).reshape(-1, {h * w}, {c})")
    return y, TensorSpec("sequence", (h * w, c))


# image -> vector
def _draw_global_pool(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    options = ["adaptive_avg", "mean", "amax"]
    if math.prod(spec.shape) <= limits.max_features:
        options.append("flatten")
    return {"how": draw(st.sampled_from(options))}


def _emit_global_pool(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    c = spec.shape[0]
    how = q["how"]
    if how == "adaptive_avg":
        return e.let(f"torch.flatten(F.adaptive_avg_pool2d({x}, 1), 1)"), TensorSpec("vector", (c,))
    if how == "mean":
        return e.let(f"{x}.mean((2, 3))"), TensorSpec("vector", (c,))
    if how == "amax":
        return e.let(f"{x}.amax((2, 3))"), TensorSpec("vector", (c,))
    return e.let(f"torch.flatten({x}, 1)"), TensorSpec("vector", (math.prod(spec.shape),))


# linear [+ activation] (sequence or vector)
def _draw_linear(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"out": _channels(draw, limits), "bias": draw(st.booleans()), "act": draw(st.sampled_from(_ACT_CHOICES))}


def _emit_linear(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {q['out']}, bias={q['bias']})")
    return _act(e, e.let(f"self.{p}fc({x})"), q["act"]), _with_channels(spec, q["out"])


# residual linear: linear(x) [+ act] + x [relu]
def _emit_residual_linear(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {spec.channels})")
    y = _act(e, e.let(f"self.{p}fc({x})"), q["act"])
    other = e.let(f"{x}.transpose(1, 2)") if q.get("other") == "transposed" else x  # a non-contiguous view
    y = e.let(f"{other} + {y}" if q["skip_first"] else f"{y} + {other}")
    if q["post_relu"]:
        y = e.let(f"F.relu({y})")
    return y, spec


def _draw_residual_linear(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    q = {"act": draw(st.sampled_from(_ACT_CHOICES)), "skip_first": draw(st.booleans()), "post_relu": draw(st.booleans())}
    if spec.kind == "sequence" and spec.shape[0] == spec.shape[1]:  # square: the residual may be x transposed
        q["other"] = draw(st.sampled_from(["x", "transposed"]))
    return q


# linear + BatchNorm1d [+ act] (vector)
def _emit_linear_bn(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {q['out']}, bias={q['bias']})")
    e.attr(f"{p}bn", f"torch.nn.BatchNorm1d({q['out']})")
    y = e.let(f"self.{p}bn(self.{p}fc({x}))")
    return _act(e, y, q["act"]), TensorSpec("vector", (q["out"],))


# LayerNorm, plain or as a pre-norm residual
def _draw_layer_norm(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"affine": draw(st.booleans()), "prenorm_residual": draw(st.booleans())}


def _emit_layer_norm(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    d = spec.channels
    e.attr(f"{p}norm", f"torch.nn.LayerNorm({d}, elementwise_affine={q['affine']})")
    y = e.let(f"self.{p}norm({x})")
    if q["prenorm_residual"]:
        e.attr(f"{p}fc", f"torch.nn.Linear({d}, {d})")
        y = e.let(f"{x} + self.{p}fc({y})")
    return y, spec


# GLU: linear to 2*out, glu
def _draw_glu(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"out": _channels(draw, limits)}


def _emit_glu(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {2 * q['out']})")
    return e.let(f"F.glu(self.{p}fc({x}), dim=-1)"), _with_channels(spec, q["out"])


# matmul with a weight parameter [+ bias parameter]
def _draw_weight_matmul(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"out": _channels(draw, limits), "bias": draw(st.booleans())}


def _emit_weight_matmul(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}weight", f"torch.nn.Parameter(torch.empty({spec.channels}, {q['out']}))")
    y = e.let(f"torch.matmul({x}, self.{p}weight)")
    if q["bias"]:
        e.attr(f"{p}bias", f"torch.nn.Parameter(torch.empty({q['out']}))")
        y = e.let(f"{y} + self.{p}bias")
    return y, _with_channels(spec, q["out"])


# gating: x * sigmoid(linear(x))
def _draw_gate(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"gate_first": draw(st.booleans())}


def _emit_gate(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {spec.channels})")
    g = e.let(f"torch.sigmoid(self.{p}fc({x}))")
    return e.let(f"{g} * {x}" if q["gate_first"] else f"{x} * {g}"), spec


# one linear at several call sites
def _draw_shared_linear(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"calls": draw(st.integers(2, 3)), "act": draw(st.sampled_from(_ACT_CHOICES))}


def _emit_shared_linear(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    e.attr(f"{p}fc", f"torch.nn.Linear({spec.channels}, {spec.channels})")
    y = e.let(f"self.{p}fc({x})")
    for _ in range(q["calls"] - 1):
        y = e.let(f"self.{p}fc({_act(e, y, q['act'])})")
    return y, spec


# self-attention: q/k/v linears, matmul, softmax, matmul, output linear [+ x]
def _draw_attention(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    d = spec.shape[1]
    return {"heads": draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0])), "residual": draw(st.booleans())}


def _emit_attention(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    length, d = spec.shape
    h = q["heads"]
    for name in ("q", "k", "v", "out"):
        e.attr(f"{p}{name}", f"torch.nn.Linear({d}, {d})")
    qv, kv, vv = (e.let(f"self.{p}{name}({x})") for name in ("q", "k", "v"))
    if h > 1:
        qv, kv, vv = (e.let(f"{t}.reshape(-1, {length}, {h}, {d // h}).transpose(1, 2)") for t in (qv, kv, vv))
    s = e.let(f"torch.matmul({qv}, {kv}.transpose(-2, -1)) * {(d // h) ** -0.5!r}")
    a = e.let(f"torch.softmax({s}, dim=-1)")
    o = e.let(f"torch.matmul({a}, {vv})")
    if h > 1:
        o = e.let(f"{o}.transpose(1, 2).reshape(-1, {length}, {d})")
    o = e.let(f"self.{p}out({o})")
    if q["residual"]:
        o = e.let(f"{o} + {x}")
    return o, spec


# conv1d over a sequence (transpose, conv1d, transpose back: a non-contiguous result)
def _draw_conv1d(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {
        "out": _channels(draw, limits),
        "kernel": draw(st.sampled_from([1, 3])),
        "depthwise": draw(st.booleans()),
        "act": draw(st.sampled_from(_ACT_CHOICES)),
    }


def _emit_conv1d(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    length, d = spec.shape
    k = q["kernel"]
    out, groups = (d, d) if q["depthwise"] else (q["out"], 1)
    e.attr(f"{p}conv", f"torch.nn.Conv1d({d}, {out}, {k}, padding={k // 2}, groups={groups})")
    y = e.let(f"self.{p}conv({x}.transpose(1, 2))")
    y = _act(e, y, q["act"])
    return e.let(f"{y}.transpose(1, 2)"), TensorSpec("sequence", (length, out))


# sequence -> vector
def _draw_seq_pool(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    options = ["mean", "first"] + (["flatten"] if math.prod(spec.shape) <= limits.max_features else [])
    return {"how": draw(st.sampled_from(options))}


def _emit_seq_pool(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    length, d = spec.shape
    if q["how"] == "mean":
        return e.let(f"{x}.mean(1)"), TensorSpec("vector", (d,))
    if q["how"] == "first":
        return e.let(f"{x}[:, 0]"), TensorSpec("vector", (d,))
    return e.let(f"torch.flatten({x}, 1)"), TensorSpec("vector", (length * d,))


# vector -> sequence
def _draw_unflatten(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    f = spec.shape[0]
    return {"length": draw(st.sampled_from([d for d in _divisors(f) if 1 < d < f]))}


def _emit_unflatten(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    length = q["length"]
    d = spec.shape[0] // length
    return e.let(f"{x}.reshape(-1, {length}, {d})"), TensorSpec("sequence", (length, d))


# tokens -> sequence
def _draw_embedding(draw: Draw, spec: TensorSpec, limits: Limits) -> dict:
    return {"dim": _channels(draw, limits), "positions": draw(st.booleans())}


def _emit_embedding(e: _Emitter, p: str, x: str, spec: TensorSpec, q: dict) -> tuple:
    (length,) = spec.shape
    e.attr(f"{p}embed", f"torch.nn.Embedding({spec.vocab}, {q['dim']})")
    y = e.let(f"self.{p}embed({x})")
    if q["positions"]:
        e.attr(f"{p}positions", f"torch.nn.Parameter(torch.empty({length}, {q['dim']}))")
        y = e.let(f"{y} + self.{p}positions")
    return y, TensorSpec("sequence", (length, q["dim"]))


def _small_channels(spec: TensorSpec, limits: Limits) -> bool:
    return spec.channels <= limits.max_channels


_FLOAT = ("image", "sequence", "vector")
_LAST_DIM = ("sequence", "vector")

#: The grammar, in shrinking order (simpler blocks first). Name -> :class:`Block`.
BLOCKS: dict[str, Block] = {
    b.name: b
    for b in [
        Block("conv_bn_act", ("image",), _draw_conv, _emit_conv, doc="conv2d (1x1/3x3, stride 1/2) [+ BatchNorm2d] [+ activation]"),
        Block("linear_act", _LAST_DIM, _draw_linear, _emit_linear, doc="linear [+ activation]"),
        Block("embedding", ("tokens",), _draw_embedding, _emit_embedding, to_kind="sequence",
              doc="nn.Embedding of int64 token ids [+ a positions parameter]"),
        Block("residual", ("image",), _draw_residual, _emit_residual, doc="conv3x3 [+ bn] [+ act] + x [+ relu]"),
        Block("residual_linear", _LAST_DIM, _draw_residual_linear, _emit_residual_linear,
              doc="linear(x) [+ act] + x (or x.transpose(1, 2) when square) [+ relu]: x may be non-contiguous"),
        Block("grouped_conv", ("image",), _draw_grouped, _emit_grouped, applies=lambda s, lim: s.shape[0] >= 2,
              doc="grouped / depthwise, optionally dilated conv2d [+ bn] [+ act]"),
        Block("conv_transpose", ("image",), _draw_transposed, _emit_transposed, doc="conv_transpose2d (same size or 2x) [+ act]"),
        Block("pool", ("image",), _draw_pool, _emit_pool, doc="max_pool2d, avg_pool2d, adaptive avg/max pool"),
        Block("upsample", ("image",), _draw_upsample, _emit_upsample,
              applies=lambda s, lim: 2 * max(s.shape[1:]) <= lim.max_spatial, doc="interpolate nearest, 2x"),
        Block("squeeze_excite", ("image",), _draw_se, _emit_se, doc="x * sigmoid(fc(relu(fc(avg(x))))) (conv or linear fcs)"),
        Block("cat", _FLOAT, _draw_cat, _emit_cat, applies=_small_channels,
              doc="cat of the input twice, of the input and a branch, of two branches, or along the length"),
        Block("chunk", _FLOAT, _draw_chunk, _emit_chunk, applies=lambda s, lim: s.channels % 2 == 0,
              doc="chunk in two along the features, then add, gate or swap-cat"),
        Block("conv3d", ("image",), _draw_conv3d, _emit_conv3d, doc="conv3d over the image as a 1- or 2-deep volume [+ act]"),
        Block("shared_block", _FLOAT, _draw_shared_block, _emit_shared_block,
              doc="one submodule (conv [+ bn] + relu, or linear + relu) called twice"),
        Block("shared_linear", _LAST_DIM, _draw_shared_linear, _emit_shared_linear, doc="one nn.Linear at 2-3 call sites"),
        Block("layer_norm", _LAST_DIM, _draw_layer_norm, _emit_layer_norm, doc="LayerNorm [as x + fc(norm(x))]"),
        Block("glu", _LAST_DIM, _draw_glu, _emit_glu, doc="linear to 2*out, then F.glu"),
        Block("weight_matmul", _LAST_DIM, _draw_weight_matmul, _emit_weight_matmul, doc="torch.matmul with a weight parameter [+ bias]"),
        Block("gate_mul", _LAST_DIM, _draw_gate, _emit_gate, doc="x * sigmoid(linear(x)): a binary mul of activations"),
        Block("linear_bn", ("vector",), _draw_linear, _emit_linear_bn, doc="linear + BatchNorm1d [+ activation]"),
        Block("self_attention", ("sequence",), _draw_attention, _emit_attention,
              doc="q/k/v linears, q @ k^T, softmax, @ v (1, 2 or 4 heads), output linear [+ x]"),
        Block("conv1d", ("sequence",), _draw_conv1d, _emit_conv1d, doc="transpose, conv1d (depthwise or not) [+ act], transpose back"),
        Block("to_sequence", ("image",), _draw_to_sequence, _emit_to_sequence, to_kind="sequence",
              applies=lambda s, lim: s.shape[1] * s.shape[2] <= lim.max_length, doc="flatten + transpose (or permute + reshape) to (N, H*W, C)"),
        Block("global_pool", ("image",), _draw_global_pool, _emit_global_pool, to_kind="vector",
              doc="adaptive avg pool / mean / amax / flatten to (N, F)"),
        Block("seq_pool", ("sequence",), _draw_seq_pool, _emit_seq_pool, to_kind="vector", doc="mean over the length, first position, or flatten"),
        Block("unflatten", ("vector",), _draw_unflatten, _emit_unflatten, to_kind="sequence",
              applies=lambda s, lim: any(1 < d < s.shape[0] for d in _divisors(s.shape[0])), doc="reshape (N, F) to (N, L, F/L)"),
    ]
}

_INPUT_KINDS = ("image", "sequence", "tokens", "vector")


# --------------------------------------------------------------------------- a generated case
@dataclass(frozen=True)
class BlockCall:
    """One block of a graph: the block's name and its drawn parameters, with the specs around it."""

    block: str
    params: tuple  # ((name, value), ...), in draw order
    input: TensorSpec
    output: TensorSpec

    def __repr__(self) -> str:
        return f"{self.block}({', '.join(f'{k}={v!r}' for k, v in self.params)})"


_SOURCE_HEADER = '''"""{title}"""

import torch
import torch.nn.functional as F

SEED = {seed}
BATCH = {batch}
DYNAMIC_BATCH = {dynamic}


class RandomGraphModel(torch.nn.Module):
{body}


def init_parameters(model, seed=SEED):
    """Deterministic values for every parameter and buffer (batch-norm statistics included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5, generator=g)
                module.bias.uniform_(-0.2, 0.2, generator=g)
                module.running_mean.uniform_(-0.5, 0.5, generator=g)
                module.running_var.uniform_(0.5, 2.0, generator=g)
        norms = {{id(p) for m in model.modules() if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))
                 for p in m.parameters()}}
        for name, p in model.named_parameters():
            if id(p) in norms:
                continue
            if isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.Embedding):
                p.normal_(0.0, 1.0, generator=g)
            elif name.endswith("norm.weight"):
                p.uniform_(0.8, 1.2, generator=g)
            elif p.dim() >= 2:  # variance 1 / fan-in (a bare matmul weight is (in, out))
                bound = (3.0 / (p.shape[0] if "." not in name else p[0].numel())) ** 0.5
                p.uniform_(-bound, bound, generator=g)
            else:
                p.uniform_(-0.2, 0.2, generator=g)
    return model


def make_model(seed=SEED):
    """The eval-mode model, initialised from seed."""
    return init_parameters(RandomGraphModel(), seed).eval()


def _draw_inputs(g, batch):
    return ({input_expr},)


def make_inputs(seed=SEED, batch=BATCH):
    """The example inputs (values bounded: randn clamped to [-3, 3], or token ids)."""
    return _draw_inputs(torch.Generator().manual_seed(seed + 1), batch)


def make_calibration(seed=SEED, count={calibration}):
    """Calibration batches: the example inputs, then count - 1 more (other batch sizes when the batch is dynamic)."""
    batches = [make_inputs(seed)]
    for i in range(1, count):
        batch = BATCH + (i % 2) if DYNAMIC_BATCH else BATCH
        batches.append(_draw_inputs(torch.Generator().manual_seed(seed + 1 + i), batch))
    return batches


def make_dynamic_shapes():
    """torch.export dynamic_shapes: the batch dimension when DYNAMIC_BATCH, else None."""
    return ({{0: torch.export.Dim("batch")}},) if DYNAMIC_BATCH else None


if __name__ == "__main__":
    model = make_model()
    print(model(*make_inputs()).shape)
'''


@dataclass(frozen=True)
class RandomGraph:
    """A generated model graph: what it is made of, and everything needed to run it.

    ``build()``: a fresh eval-mode module (identical for the same graph: parameters and
    batch-norm statistics are drawn from ``seed``); ``model``: one such module, built once;
    ``example_inputs``; ``calibration`` (the example inputs first, then more batches);
    ``dynamic_shapes`` (for ``torch.export.export`` / ``qcore.quantize``); ``to_source()``.
    """

    input: TensorSpec
    blocks: tuple  # of BlockCall
    seed: int = 0
    batch: int = 2
    dynamic_batch: bool = False
    calibration_batches: int = 3
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    # -- what it is
    @property
    def block_names(self) -> tuple:
        return tuple(call.block for call in self.blocks)

    @property
    def output_spec(self) -> TensorSpec:
        return self.blocks[-1].output if self.blocks else self.input

    def describe(self) -> str:
        """One line per block: its parameters and the shapes around it."""
        lines = [f"input {self.input} (batch {self.batch}{', dynamic' if self.dynamic_batch else ''}), seed {self.seed}"]
        lines += [f"b{i} {call!r}: {call.input} -> {call.output}" for i, call in enumerate(self.blocks)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"RandomGraph(input={self.input}, batch={self.batch}, dynamic_batch={self.dynamic_batch}, "
                f"seed={self.seed}, blocks=[{', '.join(map(repr, self.blocks))}])")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints falsifying examples with this
        printer.text(repr(self))

    # -- its source
    def to_source(self) -> str:
        """A self-contained Python module (imports torch only) that rebuilds this graph:
        ``RandomGraphModel``, ``make_model()``, ``make_inputs()``, ``make_calibration()``,
        ``make_dynamic_shapes()``."""
        if "source" not in self._cache:
            self._cache["source"] = self._render()
        return self._cache["source"]

    def _render(self) -> str:
        e = _Emitter()
        x = "x"
        for i, call in enumerate(self.blocks):
            e.stmt(f"# b{i} {call!r}: {call.input} -> {call.output}")
            x, out = BLOCKS[call.block].emit(e, f"b{i}_", x, call.input, dict(call.params))
            if out != call.output:  # the drawn spec and the emitted code must agree
                raise AssertionError(f"block b{i} {call!r}: emitted {out}, drawn {call.output}")
        init = ["def __init__(self):", "    super().__init__()"] + [f"    {line}" for line in e.init]
        forward = ["def forward(self, x):"] + [f"    {line}" for line in e.forward] + [f"    return {x}"]
        body = "\n".join(f"    {line}" if line else "" for line in init + [""] + forward)
        spec = self.input
        if spec.kind == "tokens":
            input_expr = f"torch.randint(0, {spec.vocab}, (batch, {spec.shape[0]}), generator=g)"
        else:
            input_expr = f"torch.randn((batch, {', '.join(map(str, spec.shape))}), generator=g).clamp(-3.0, 3.0)"
        title = (f"A qcore.testing.random_graphs graph: {' -> '.join(self.block_names) or 'identity'}.\n\n"
                 + "\n".join(self.describe().splitlines()) + "\n")
        return _SOURCE_HEADER.format(
            title=title, seed=self.seed, batch=self.batch, dynamic=self.dynamic_batch, body=body,
            input_expr=input_expr, calibration=self.calibration_batches,
        )

    def namespace(self) -> dict:
        """The executed source's globals (compiled once per graph, registered with linecache so
        tracebacks and ``inspect`` show the generated lines)."""
        if "namespace" not in self._cache:
            source = self.to_source()
            filename = f"<qcore-random-graph-{hashlib.sha1(source.encode()).hexdigest()[:12]}>"
            linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
            namespace: dict = {"__name__": "qcore_random_graph"}
            exec(compile(source, filename, "exec"), namespace)
            self._cache["namespace"] = namespace
        return self._cache["namespace"]

    # -- running it
    def build(self) -> torch.nn.Module:
        """A fresh eval-mode module, initialised from ``seed`` (the same values every call)."""
        return self.namespace()["make_model"](self.seed)

    @property
    def model(self) -> torch.nn.Module:
        """One eval-mode module of this graph, built on first use (``build()`` for a fresh one)."""
        if "model" not in self._cache:
            self._cache["model"] = self.build()
        return self._cache["model"]

    @property
    def example_inputs(self) -> tuple:
        if "inputs" not in self._cache:
            self._cache["inputs"] = self.namespace()["make_inputs"](self.seed)
        return self._cache["inputs"]

    @property
    def calibration(self) -> list:
        """``calibration_batches`` tuples of inputs; the first is ``example_inputs``."""
        if "calibration" not in self._cache:
            self._cache["calibration"] = [self.example_inputs] + self.namespace()["make_calibration"](self.seed)[1:]
        return self._cache["calibration"]

    @property
    def dynamic_shapes(self) -> Optional[tuple]:
        return self.namespace()["make_dynamic_shapes"]()

    def export(self, model: Optional[torch.nn.Module] = None, training: bool = False) -> torch.fx.GraphModule:
        """``torch.export.export(...).module()`` of ``model`` (default: a fresh ``build()``), in
        train mode if ``training`` else eval mode (the model's modes are restored)."""
        model = self.build() if model is None else model
        modes = [(module, module.training) for module in model.modules()]
        model.train(training)
        try:
            return torch.export.export(model, self.example_inputs, dynamic_shapes=self.dynamic_shapes).module()
        finally:
            for module, mode in modes:
                module.training = mode


# --------------------------------------------------------------------------- the strategy
def _draw_input(draw: Draw, kind: str, limits: Limits) -> TensorSpec:
    if kind == "image":
        return _image(draw(st.integers(1, min(8, limits.max_channels))), draw(st.integers(4, limits.max_spatial)),
                      draw(st.integers(4, limits.max_spatial)))
    if kind == "sequence":
        return TensorSpec("sequence", (draw(st.integers(1, 16)), _channels(draw, limits)))
    if kind == "tokens":
        return TensorSpec("tokens", (draw(st.integers(1, 16)),), torch.int64, vocab=draw(st.integers(2, 32)))
    return TensorSpec("vector", (draw(st.integers(1, limits.max_channels)),))


def random_graphs(
    min_blocks: int = 3,
    max_blocks: int = 12,
    blocks: Optional[Iterable[str]] = None,
    *,
    image: bool = True,
    sequence: bool = True,
    tokens: bool = True,
    vector: bool = True,
    dynamic_batch: Optional[bool] = None,
    max_channels: int = 16,
    max_spatial: int = 16,
    calibration_batches: int = 3,
) -> st.SearchStrategy[RandomGraph]:
    """A hypothesis strategy of :class:`RandomGraph`.

    ``min_blocks``..``max_blocks`` blocks (fewer only when the allowed blocks cannot continue the
    graph), chosen from ``blocks`` (names in :data:`BLOCKS`; default: all). ``image`` /
    ``sequence`` / ``tokens`` / ``vector``: which graph inputs may be drawn ((N, C, H, W) float,
    (N, L, D) float, (N, L) int64 token ids, (N, F) float). ``dynamic_batch``: None draws it.
    ``max_channels`` bounds the channels and features a block chooses (cat may double them),
    ``max_spatial`` the input's height and width.
    """
    if not 1 <= min_blocks <= max_blocks:
        raise ValueError(f"need 1 <= min_blocks <= max_blocks, got {min_blocks}, {max_blocks}")
    names = list(BLOCKS) if blocks is None else list(blocks)
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; known: {sorted(BLOCKS)}")
    allowed = [BLOCKS[n] for n in BLOCKS if n in names]  # grammar order: shrinking prefers earlier blocks
    kinds = [k for k, on in zip(_INPUT_KINDS, (image, sequence, tokens, vector)) if on and any(k in b.kinds for b in allowed)]
    if not kinds:
        raise ValueError(f"no allowed input kind has an allowed block (blocks={names})")
    limits = Limits(max_channels=max_channels, max_spatial=max_spatial)
    kinds_with_blocks = {k for b in allowed for k in b.kinds}
    # images have the most blocks: drawn three times as often as each other kind
    weighted_kinds = [k for k in kinds for _ in range(3 if k == "image" else 1)]

    @st.composite
    def strategy(draw: Draw) -> RandomGraph:
        spec = _draw_input(draw, draw(st.sampled_from(weighted_kinds)), limits)
        start = spec
        calls = []
        for index in range(max_blocks):
            # past min_blocks, go on with probability 4/5; a 0 stops: shrinking deletes blocks
            if index >= min_blocks and draw(st.integers(0, 4)) == 0:
                break
            choices = [b for b in allowed if b.accepts(spec, limits) and (b.to_kind is None or b.to_kind in kinds_with_blocks)]
            staying = [b for b in choices if b.to_kind is None]
            leaving = [b for b in choices if b.to_kind is not None]
            if staying and leaving:  # change kinds (image -> sequence -> vector) one time in four
                choices = leaving if draw(st.integers(0, 3)) == 3 else staying
            if not choices:
                break
            block = draw(st.sampled_from(choices))
            params = block.draw(draw, spec, limits)
            _, out = block.emit(_Emitter(), "b_", "x", spec, params)
            calls.append(BlockCall(block.name, tuple(params.items()), spec, out))
            spec = out
        dynamic = draw(st.booleans()) if dynamic_batch is None else dynamic_batch
        return RandomGraph(
            input=start, blocks=tuple(calls), seed=draw(st.integers(0, 2**16)), batch=draw(st.integers(2, 4)),
            dynamic_batch=dynamic, calibration_batches=calibration_batches,
        )

    return strategy()


# --------------------------------------------------------------------------- helpers for property tests
def snapshot_state(model: torch.nn.Module) -> dict:
    """Copies of everything a quantization flow must not change in the user's model: its
    state_dict, its parameters (with requires_grad), its train/eval mode per submodule."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "parameters": [(name, p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()],
        "training": [(name, m.training) for name, m in model.named_modules()],
    }


def assert_state_unchanged(model: torch.nn.Module, snapshot: dict) -> None:
    """Assert that ``model`` is bit-equal to :func:`snapshot_state`'s ``snapshot`` (the first
    difference is the message)."""
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(snapshot["state"]), f"state_dict keys changed: {sorted(set(state) ^ set(snapshot['state']))}"
    for name, before in snapshot["state"].items():
        after = state[name].detach()
        assert after.dtype == before.dtype and after.shape == before.shape, f"{name}: {before.dtype}{tuple(before.shape)} -> {after.dtype}{tuple(after.shape)}"
        assert torch.equal(after, before), f"{name} changed (max |diff| {(after.double() - before.double()).abs().max().item()})"
    parameters = [(name, p.detach(), p.requires_grad) for name, p in model.named_parameters()]
    assert [n for n, _, _ in parameters] == [n for n, _, _ in snapshot["parameters"]], "the parameters changed"
    for (name, after, grad_after), (_, before, grad_before) in zip(parameters, snapshot["parameters"]):
        assert torch.equal(after, before), f"parameter {name} changed"
        assert grad_after == grad_before, f"parameter {name}: requires_grad {grad_before} -> {grad_after}"
    assert [(n, m.training) for n, m in model.named_modules()] == snapshot["training"], "train/eval mode changed"


def distillation_train_fn(graph: "RandomGraph", model: torch.nn.Module, steps: int = 2,
                          lr: float = 1e-3) -> Callable[[torch.nn.Module], None]:
    """A QAT ``train_fn`` for a random graph: ``steps`` SGD steps (one per calibration batch)
    pulling the prepared model's outputs towards the float ``model``'s (mean squared error).

    The targets are computed now, from ``model`` as it is; the returned function trains the
    prepared module in place. A graph without trainable parameters still runs the batches, so
    its fake-quantizers observe them.
    """
    batches = graph.calibration[:steps]
    with torch.no_grad():
        targets = [model(*batch) for batch in batches]

    def train(prepared: torch.nn.Module) -> None:
        parameters = [p for p in prepared.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(parameters, lr=lr) if parameters else None
        for batch, target in zip(batches, targets):
            loss = (prepared(*batch) - target).pow(2).mean()
            if optimizer is not None and loss.requires_grad:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    return train


_QDQ_NAMESPACE = "quantized_decomposed"


def _qdq_name(node: torch.fx.Node) -> Optional[str]:
    """``quantize_per_tensor``, ``dequantize_per_channel``, ... of a q/dq node; None for any other node."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return None
    namespace, _, name = schema.name.partition("::")
    if namespace == _QDQ_NAMESPACE and name.split("_per_")[0] in ("quantize", "dequantize"):
        return name
    return None


def _op_of(node: torch.fx.Node) -> str:
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(node.target, "__name__", str(node.target))


def largest_activation_scale(converted: torch.fx.GraphModule) -> float:
    """The largest scale of a per-tensor quantize in ``converted`` (0.0 if none): one
    quantization step of its coarsest activation."""
    scales = [float(n.args[1]) for n in converted.graph.nodes
              if _qdq_name(n) == "quantize_per_tensor" and isinstance(n.args[1], (int, float))]
    return max(scales, default=0.0)


@dataclass(frozen=True)
class QuantizedEdge:
    """A producer -> consumer edge that carries quantize/dequantize in a converted program.

    ``producer``: the producing node's name (``"constant"`` for a get_attr: a weight or a
    lifted scalar); ``consumer``: the consuming node's name; ``index``: which of the consumer's
    node inputs (in argument order) it is. ``granularity``/``dtype``/``quant_min``/``quant_max``:
    what the dequantize says. ``share``: the (scale, zero_point) of a static per-tensor edge,
    equal for edges that share one observer; ``producer_op``/``consumer_op``: the ops, for
    reading a difference.
    """

    producer: str
    consumer: str
    index: int
    granularity: str
    dtype: str
    quant_min: int
    quant_max: int
    share: Any = field(default=None, compare=False)
    producer_op: str = field(default="", compare=False)
    consumer_op: str = field(default="", compare=False)

    @property
    def key(self) -> tuple:
        return (self.producer, self.consumer, self.index)

    def __str__(self) -> str:
        return (f"{self.producer} ({self.producer_op}) -> {self.consumer} ({self.consumer_op}) input {self.index}: "
                f"{self.granularity} {self.dtype} [{self.quant_min}, {self.quant_max}]")


def _node_inputs(node: torch.fx.Node) -> list:
    leaves: list = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: leaves.append(n))
    return leaves


def quantized_edges(converted: torch.fx.GraphModule) -> dict:
    """``{edge.key: QuantizedEdge}`` of a converted (q/dq) program: every input of a non-q/dq
    node that is a dequantize, traced back through the q/dq chain to the node it quantizes."""
    edges = {}
    for node in converted.graph.nodes:
        if _qdq_name(node) is not None or node.op in ("placeholder", "get_attr"):
            continue
        for index, arg in enumerate(_node_inputs(node)):
            dq = _qdq_name(arg)
            if dq is None or not dq.startswith("dequantize"):
                continue
            producer = arg
            while _qdq_name(producer) is not None:
                producer = producer.args[0]
            granularity = "per_channel" if "per_channel" in dq else ("dynamic" if isinstance(arg.args[1], torch.fx.Node) and _op_of(producer) != "get_attr" else "per_tensor")
            qmin, qmax, dtype = arg.args[-3:] if "per_channel" in dq else arg.args[3:6]
            share = (float(arg.args[1]), int(arg.args[2])) if isinstance(arg.args[1], (int, float)) else None
            name = "constant" if producer.op == "get_attr" else producer.name
            edge = QuantizedEdge(name, node.name, index, granularity, str(dtype).replace("torch.", ""), int(qmin), int(qmax),
                                 share=share, producer_op=_op_of(producer), consumer_op=_op_of(node))
            edges[edge.key] = edge
    return edges


@dataclass(frozen=True)
class EdgeDifference:
    """How two programs' quantized edges differ at one edge.

    ``kind``: ``"only_a"`` / ``"only_b"`` (quantized in one program only), ``"attributes"``
    (both quantize it, differently), ``"sharing"`` (they share qparams with different edges).
    """

    kind: str
    key: tuple
    a: Optional[QuantizedEdge]
    b: Optional[QuantizedEdge]
    detail: str = ""
    #: for ``"sharing"``: the keys of the edges it shares qparams with in one program only
    others: tuple = ()

    @property
    def edge(self) -> QuantizedEdge:
        edge = self.a if self.a is not None else self.b
        assert edge is not None, "a difference has an edge in at least one program"
        return edge

    def __str__(self) -> str:
        where = {"only_a": "only in the first", "only_b": "only in the second"}.get(self.kind, self.kind)
        return f"{where}: {self.edge}" + (f" ({self.detail})" if self.detail else "")


def edge_differences(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> list:
    """The :class:`EdgeDifference` list between two converted programs of the same exported
    graph (node names match), in graph order of ``a`` then ``b``: edges quantized in one only,
    edges quantized with other dtype / granularity / range, and edges whose sharing differs
    (the edges sharing an edge's (scale, zero_point), among the edges both quantize)."""
    edges_a, edges_b = quantized_edges(a), quantized_edges(b)
    out = [EdgeDifference("only_a", k, e, None) for k, e in edges_a.items() if k not in edges_b]
    out += [EdgeDifference("only_b", k, None, e) for k, e in edges_b.items() if k not in edges_a]
    common = [k for k in edges_a if k in edges_b]
    for k in common:
        if edges_a[k] != edges_b[k]:
            out.append(EdgeDifference("attributes", k, edges_a[k], edges_b[k], f"{edges_a[k]} vs {edges_b[k]}"))

    def groups(edges: dict) -> dict:
        by_share: dict = {}
        for k in common:
            if edges[k].share is not None and edges[k].granularity == "per_tensor":
                by_share.setdefault((edges[k].share, edges[k].dtype), set()).add(k)
        return {k: frozenset(g) for g in by_share.values() for k in g}

    group_a, group_b = groups(edges_a), groups(edges_b)
    for k in common:
        ga, gb = group_a.get(k, frozenset([k])), group_b.get(k, frozenset([k]))
        if ga != gb:
            def names(g: frozenset) -> str:
                return ", ".join(sorted(f"{p}->{c}[{i}]" for p, c, i in g if (p, c, i) != k)) or "nothing"
            out.append(EdgeDifference("sharing", k, edges_a[k], edges_b[k], f"shares with {names(ga)} vs {names(gb)}",
                                      others=tuple(sorted(ga ^ gb))))
    return out


#: Ops whose quantization follows their neighbours' (they share their input's qparams, or a
#: backend quantizes them only when what feeds them is quantized): a difference upstream
#: carries through them, so a difference at one of them that touches an explained one is
#: explained by it.
PROPAGATING_OPS = frozenset({
    "cat", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "flatten", "view", "reshape", "_unsafe_view",
    "transpose", "permute", "slice", "select", "getitem", "split", "chunk", "squeeze", "unsqueeze", "clone",
    "contiguous", "relu", "relu_", "hardtanh", "hardtanh_", "mean", "output", "pad", "upsample_nearest2d",
    "adaptive_max_pool2d", "amax", "expand", "stack", "unbind",
})


@dataclass(frozen=True)
class ProgramPair:
    """The two converted programs compared: ``a`` (first) and ``b`` (second), by node name."""

    a: torch.fx.GraphModule
    b: torch.fx.GraphModule

    def node(self, side: str, name: str) -> Optional[torch.fx.Node]:
        graph = (self.a if side == "a" else self.b).graph
        return next((n for n in graph.nodes if n.name == name), None)

    def op(self, name: str) -> str:
        """The op of node ``name`` (in ``a``, else in ``b``; "" if in neither)."""
        node = self.node("a", name) or self.node("b", name)
        return "" if node is None else _op_of(node)

    def quantized_inputs(self, side: str, name: str) -> int:
        """How many inputs of node ``name`` carry q/dq in program ``side``."""
        edges = quantized_edges(self.a if side == "a" else self.b)
        return sum(1 for (_, consumer, _) in edges if consumer == name)


@dataclass(frozen=True)
class KnownDifference:
    """An expected kind of difference between two backends' programs: ``matches(difference,
    pair)`` says whether a :class:`EdgeDifference` is of this kind; ``reason`` says why it is
    expected."""

    name: str
    reason: str
    matches: Callable[[EdgeDifference, ProgramPair], bool]


def explain_differences(differences: Sequence, known: Sequence, a: torch.fx.GraphModule, b: torch.fx.GraphModule,
                        propagating: frozenset = PROPAGATING_OPS) -> list:
    """``[(difference, why)]``: ``why`` is the name of the :class:`KnownDifference` that matches
    it, ``"<name> (through <node>)"`` for a difference it carries through a propagating op
    (see :data:`PROPAGATING_OPS`), ``"<name> (sharing at <node>)"`` for a sharing difference
    whose partners touch an explained difference, or None: unexplained."""
    pair = ProgramPair(a, b)
    why: dict = {}
    for index, difference in enumerate(differences):
        for kind in known:
            if kind.matches(difference, pair):
                why[index] = kind.name
                break
    changed = True
    while changed:
        changed = False
        for index, difference in enumerate(differences):
            if index in why:
                continue
            if difference.kind == "sharing":
                nodes = {n for key in difference.others for n in key[:2]} - {"constant"}
                cause = next(((why[j], n) for j, other in enumerate(differences) if j in why and other.kind != "sharing"
                              for n in other.key[:2] if n in nodes), None)
                if cause is not None:
                    why[index] = f"{cause[0].split(' (')[0]} (sharing at {cause[1]})"
                    changed = True
                continue
            for node in difference.key[:2]:
                if pair.op(node) not in propagating:
                    continue
                cause = next((why[j] for j, other in enumerate(differences) if j in why and node in other.key[:2]), None)
                if cause is not None:
                    why[index] = f"{cause.split(' (')[0]} (through {node})"
                    changed = True
                    break
    return [(difference, why.get(index)) for index, difference in enumerate(differences)]
