"""The user's objects the commands load by name: a model factory and a calibration loader.

``PKG.MODULE:NAME`` imports a module (the current directory is on the path, as with
``python -m``); ``path/to/file.py:NAME`` runs a file.

>>> load_object("math:pi", "constant") > 3
True
"""

from __future__ import annotations

import sys
import argparse
from typing import Any, Iterator

from qcore.errors import CliError


def load_object(spec: str, what: str) -> Any:
    """The object ``spec`` names: ``pkg.module:name`` or ``path/to/file.py:name``."""
    import importlib
    import importlib.util
    import os

    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"{what} must look like PKG.MODULE:NAME or path/to/file.py:NAME, got {spec!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise CliError(f"{what}: file {module_name} does not exist")
        unique = "qcore_cli_user_" + os.path.splitext(os.path.basename(module_name))[0]
        loader_spec = importlib.util.spec_from_file_location(unique, module_name)
        if loader_spec is None or loader_spec.loader is None:  # no loader for this file name (not a .py file)
            raise CliError(f"{what}: {module_name} has no module loader (not a .py file)")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[unique] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise CliError(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current directory
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise CliError(f"{what}: cannot import module {module_name!r} ({exc})") from exc
        except Exception as exc:
            raise CliError(f"{what}: importing {module_name} raised {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise CliError(f"{what}: module {module_name} has no attribute {attribute!r}") from None


def _call(spec: str, what: str) -> Any:
    factory = load_object(spec, what)
    if not callable(factory):
        raise CliError(f"{what}: {spec} is a {type(factory).__name__}, not a callable")
    try:
        return factory()
    except Exception as exc:
        raise CliError(f"{what}: {spec}() raised {type(exc).__name__}: {exc}") from exc


class _ReloadingBatches:
    """Batches for several QAT epochs from a loader that returned a one-shot iterator (a generator):
    the first epoch reads ``first``, each later one calls the loader again."""

    def __init__(self, first: Any, loader: Any) -> None:
        self._first = first
        self._loader = loader

    def __iter__(self) -> Iterator[Any]:
        first, self._first = self._first, None
        return iter(first) if first is not None else iter(self._loader())


def model_and_inputs(args: argparse.Namespace) -> tuple:
    """(model, example_inputs, calibration batches or None) from the command's specs.

    With ``--qat`` each batch is the model's inputs followed by the target, kept for training.
    """
    import itertools

    import torch

    made = _call(args.model, "model factory")
    example_inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example_inputs = made
    if not isinstance(made, torch.nn.Module):
        raise CliError(f"model factory: {args.model}() returned {type(made).__name__}; expected a torch.nn.Module or (module, example_inputs)")
    calibration = None
    if args.calibration:
        batches = _call(args.calibration, "calibration loader")
        try:
            iterator = iter(batches)
        except TypeError:
            raise CliError(f"calibration loader: {args.calibration}() returned {type(batches).__name__}, not an iterable of batches") from None
        first = next(iterator, None)
        if first is None:
            raise CliError(f"calibration loader: {args.calibration}() gave no batches")
        if args.qat and (not isinstance(first, (tuple, list)) or len(first) < 2):
            raise CliError(
                f"--qat trains on the calibration batches, so each must be (inputs..., target); "
                f"{args.calibration}() gave a {type(first).__name__}"
                + (f" of {len(first)} item(s)" if isinstance(first, (tuple, list)) else "")
            )
        if iterator is not batches:  # a list or a DataLoader: it can be read again, from the start
            calibration = batches
        elif args.qat:
            calibration = _ReloadingBatches(itertools.chain([first], iterator), lambda: _call(args.calibration, "calibration loader"))
        else:
            calibration = itertools.chain([first], iterator)
        if example_inputs is None:
            example_inputs = (first,) if isinstance(first, torch.Tensor) else tuple(first)
            if args.calibration_has_labels or args.qat:
                example_inputs = example_inputs[:-1]
    if example_inputs is None:
        raise CliError(
            f"no example inputs: give --calibration PKG.MODULE:LOADER, or make {args.model}() return (module, example_inputs)"
        )
    return made, example_inputs, calibration


def dynamic_batch(example_inputs: Any, enabled: bool) -> Any:
    if not enabled:
        return None
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return tuple({0: batch} for _ in inputs)
