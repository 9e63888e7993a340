"""Typed records that plugins return from qcore's registration-style hooks.

A plugin never hands qcore a bare function: it hands a record that says what the function is
for, so that qcore can order, list and check contributions from many plugins.

>>> from qcore.records import Backend
>>> Backend(name="toy", quantizer_class=object, description="a toy").name
'toy'
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs


def _check_name(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value or not value.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"{type(inst).__name__}.{attribute.name} must be a non-empty name of letters, digits, "
            f"'_' or '-', got {value!r}"
        )


def _check_callable(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{type(inst).__name__}.{attribute.name} must be callable, got {value!r}")


def _always_available() -> Optional[str]:
    return None


def _no_hardware_facts() -> dict:
    return {}


@attrs.frozen
class Backend:
    """A backend a plugin provides.

    ``is_available()`` returns None when the backend can run here, or a sentence saying why not
    (missing kernels, a missing optional package). ``distribution`` is filled in by qcore.
    ``compile_options`` are the Inductor settings ``qcore.compile`` applies to this backend's
    compiled models only (e.g. ``{"freezing": True}``); empty by default.
    ``hardware()`` returns what the backend reads of the machine it runs on, as a JSON-ready
    dict (shown by ``qcore plugins``, recorded in the report); the keys are the backend's, with
    two that qcore reads: ``"describe"`` (one line for people) and ``"target"`` (the name the
    backend's ``default_config(target=...)`` takes for this machine). Empty by default.

    For the commands that pick and describe a backend without naming one (``qcore demo``,
    ``qcore quantize --backend auto``): ``preference`` ranks the available backends (highest
    wins; the built-in ``reference`` backend has 0); ``kernel_library`` names the kernels its
    lowering targets, for people ("oneDNN"); ``lowered_runs_in_process`` is False when the
    lowered program is for another runtime (ExecuTorch), so a command that times the lowered
    model keeps the q/dq program instead.
    """

    name: str = attrs.field(validator=_check_name)
    quantizer_class: type = attrs.field()
    description: str = ""
    is_available: Callable[[], Optional[str]] = attrs.field(default=_always_available, validator=_check_callable)
    plugin: str = ""
    distribution: str = ""
    compile_options: dict = attrs.field(factory=dict, converter=dict, hash=False)
    hardware: Callable[[], dict] = attrs.field(default=_no_hardware_facts, validator=_check_callable)
    preference: int = 0
    kernel_library: str = ""
    lowered_runs_in_process: bool = True


@attrs.frozen
class Annotator:
    """One op annotator, the unit the ``annotate_op`` hook contributes.

    ``fn(model, config, filter_fn) -> list[list[Node]]`` annotates every match of its pattern
    in ``model`` that ``filter_fn`` accepts, skipping nodes already claimed, and returns the
    partitions it annotated.

    ``priority`` orders the annotators of every plugin: higher runs first, so a fused pattern
    claims its nodes before the annotator of one of its parts sees them (by convention the
    number of ops the pattern matches: 3 for conv -> batch_norm -> relu, 1 for conv).
    Annotators with ``shares_input=True`` (max_pool2d, cat, ...) reuse their producer's
    observer and run after every compute annotator. ``modes`` says in which configs the
    annotator runs: "static", "dynamic", "qat" (a dynamic QAT config is "dynamic").

    Which backend an annotator serves is the ``annotate_op(backend)`` hook's business: a plugin
    returns the annotators of the backend it is asked for.
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., Any] = attrs.field(validator=_check_callable)
    priority: int = attrs.field(default=1, validator=attrs.validators.instance_of(int))
    modes: frozenset = attrs.field(converter=frozenset, default=frozenset({"static", "qat"}))
    shares_input: bool = False
    plugin: str = ""

    def __attrs_post_init__(self) -> None:
        bad = set(self.modes) - MODES
        if bad or not self.modes:
            raise ValueError(
                f"Annotator {self.name!r}: unknown modes {sorted(bad) or '(none given)'}; "
                f"allowed: {', '.join(repr(m) for m in sorted(MODES))}"
            )

    def runs_in(self, mode: str) -> bool:
        """True if the annotator applies to a config of this mode ("static", "dynamic", "qat")."""
        return mode in self.modes

    @property
    def order_key(self) -> tuple:
        """Sharing annotators last; higher priority first; then by name (deterministic)."""
        return (self.shares_input, -self.priority, self.name, self.plugin)


MODES = frozenset({"static", "dynamic", "qat"})


@attrs.frozen
class LoweringPass:
    """One graph pass a backend runs on the converted q/dq graph, the unit of ``lower_pattern``.

    ``fn(model, context) -> bool`` rewrites ``model`` in place and returns whether it changed
    anything. ``after`` names passes that must run first (missing names are ignored, so a
    third-party pass can order itself after an optional one). The backend a pass serves is the
    ``lower_pattern(backend)`` hook's business (``context.backend`` names it).
    """

    name: str = attrs.field(validator=_check_name)
    fn: Callable[..., bool] = attrs.field(validator=_check_callable)
    after: tuple = attrs.field(converter=tuple, default=())
    plugin: str = ""


@attrs.define
class LoweringContext:
    """What a lowering pass gets besides the graph.

    ``counters[name]`` counts matches per rewrite family (tests read them); ``applied`` lists
    (pass name, changed) in run order.
    """

    backend: str
    example_inputs: Optional[tuple] = None
    counters: dict = attrs.field(factory=dict)
    applied: list = attrs.field(factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


ALGORITHM_STAGES = ("float", "converted")


@attrs.frozen
class Algorithm:
    """An accuracy algorithm, the unit of the ``qcore_register_algorithms`` hook.

    ``name`` is its key in ``qcore.quantize(algorithms={name: value})``; ``stage`` says when it
    runs: ``"float"`` on qcore's copy of the exported float graph before annotation,
    ``"converted"`` on the converted q/dq program before lowering. ``fn(model, value, context)``
    returns the rewritten GraphModule, or None when it rewrote ``model`` in place.
    ``check(value)`` (optional) raises a ``ValueError`` naming the allowed values.

    >>> Algorithm(name="noop", stage="float", fn=lambda model, value, context: None).stage
    'float'
    """

    name: str = attrs.field(validator=_check_name)
    stage: str = attrs.field()
    fn: Callable[..., Any] = attrs.field(validator=_check_callable)
    check: Optional[Callable[[Any], None]] = attrs.field(default=None, validator=_check_callable)
    description: str = ""
    plugin: str = ""

    @stage.validator
    def _check_stage(self, attribute: attrs.Attribute, value: Any) -> None:
        if value not in ALGORITHM_STAGES:
            raise ValueError(f"Algorithm {self.name!r}: stage must be one of {', '.join(map(repr, ALGORITHM_STAGES))}, got {value!r}")


@attrs.define
class AlgorithmContext:
    """What an :class:`Algorithm`'s ``fn`` gets besides the model and its value: the
    ``backend``, the ``calibration`` batches (tuples of inputs), the exported ``float_model``
    (eval mode; do not change it) and ``notes`` (``note(text)`` adds a line to the report)."""

    backend: str
    calibration: list
    float_model: Any
    notes: list = attrs.field(factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
