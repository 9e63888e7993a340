"""Finds, checks, orders and calls qcore plugins. The only module that calls the hooks.

Loading order (documented, deterministic):

1. the core's own default implementations (``qcore.plugin``), through the same loader as any
   plugin;
2. every entry point of the group ``qcore``, sorted by entry-point name, one at a time.

Nothing is loaded when ``qcore`` is imported: the first call that needs plugins loads them.

Environment:

* ``QCORE_STRICT_PLUGINS=1``: a plugin that fails to load is an error instead of a warning.
* ``QCORE_BLOCK_PLUGINS=name,other``: entry points with these names are not loaded.

>>> from qcore.plugin_manager import get_plugin_manager
>>> "qcore" in [p.name for p in get_plugin_manager().plugin_infos()]
True
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import warnings
from typing import Any, Iterable, Optional

import attrs
import pluggy

from qcore import hookspecs
from qcore.errors import PluginError, UnknownBackendError
from qcore.records import Algorithm, Annotator, Backend, LoweringPass

ENTRY_POINT_GROUP = "qcore"
STRICT_ENV = "QCORE_STRICT_PLUGINS"
BLOCK_ENV = "QCORE_BLOCK_PLUGINS"
BUILTIN_PLUGINS = (("qcore", "qcore.plugin"),)


class PluginLoadWarning(UserWarning):
    """A plugin was skipped because it failed to load."""


@attrs.frozen
class PluginInfo:
    """What ``qcore plugins`` shows for one plugin."""

    name: str
    distribution: str
    version: str
    status: str  # "loaded", "failed" or "blocked"
    hooks: tuple = ()
    backends: tuple = ()
    error: str = ""
    hardware: dict = attrs.field(factory=dict)  # backend name -> Backend.hardware() of an available backend

    def to_dict(self) -> dict:
        return attrs.asdict(self, recurse=False) | {"hooks": list(self.hooks), "backends": list(self.backends)}


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _blocked_names() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


class QcorePluginManager:
    """Loads plugins once and exposes typed methods over the hooks.

    Args:
        group: the entry-point group to load (``"qcore"``; tests use their own group).
        load_builtins: register the core's default implementations first.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP, load_builtins: bool = True) -> None:
        self.group = group
        self._load_builtins = load_builtins
        self._pm: Optional[pluggy.PluginManager] = None
        self._infos: dict[str, PluginInfo] = {}
        self._backends: Optional[dict[str, Backend]] = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ loading
    @property
    def pm(self) -> pluggy.PluginManager:
        with self._lock:
            if self._pm is None:
                self._pm = self._load_all()
            return self._pm

    def _load_all(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        if self._load_builtins:
            for name, module_path in BUILTIN_PLUGINS:
                self._load_one(pm, name, "qcore", _version("qcore"), lambda m=module_path: importlib.import_module(m))
        blocked = _blocked_names()
        entry_points = sorted(importlib.metadata.entry_points(group=self.group), key=lambda ep: ep.name)
        seen: set[str] = set()
        for ep in entry_points:
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if ep.name in blocked:
                self._infos[ep.name] = PluginInfo(ep.name, dist, version, "blocked", error=f"blocked by {BLOCK_ENV}")
                continue
            self._load_one(pm, ep.name, dist, version, ep.load)
        return pm

    def _load_one(self, pm: pluggy.PluginManager, name: str, dist: str, version: str, load: Any) -> None:
        try:
            module = load()
            pm.register(module, name=name)
            self._check_hook_names(pm, name, module)
        except Exception as exc:  # a broken plugin must not take qcore down
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            message = f"qcore plugin {name!r} from distribution {dist!r} failed to load: {type(exc).__name__}: {exc}"
            self._infos[name] = PluginInfo(name, dist, version, "failed", error=f"{type(exc).__name__}: {exc}")
            if _strict():
                raise PluginError(message + f" ({STRICT_ENV} is set)") from exc
            warnings.warn(message + "; skipped", PluginLoadWarning, stacklevel=4)
            return
        hooks = tuple(sorted(impl_name for impl_name in _hook_names_of(pm, module)))
        self._infos[name] = PluginInfo(name, dist, version, "loaded", hooks=hooks)

    @staticmethod
    def _check_hook_names(pm: pluggy.PluginManager, name: str, module: Any) -> None:
        for attr in dir(module):
            impl_opts = pm.parse_hookimpl_opts(module, attr)
            if impl_opts is None:
                continue
            hook_name = impl_opts.get("specname") or attr
            caller = getattr(pm.hook, hook_name, None)
            if caller is None or caller.spec is None:
                raise PluginError(
                    f"plugin {name!r} implements {hook_name!r}, which is not a qcore hook; "
                    f"known hooks: {', '.join(sorted(_spec_names()))}"
                )

    def register(self, plugin: Any, name: str) -> None:
        """Register a module or object of hook implementations by hand (tests; embedding
        applications), checked like an entry point's; the backend list is re-read."""
        with self._lock:
            pm = self.pm
            pm.register(plugin, name=name)
            try:
                self._check_hook_names(pm, name, plugin)
            except PluginError:
                pm.unregister(name=name)
                raise
            hooks = tuple(sorted(_hook_names_of(pm, plugin)))
            self._infos[name] = PluginInfo(name, "(registered)", "-", "loaded", hooks=hooks)
            self._backends = None

    # ------------------------------------------------------------------ introspection
    def plugin_infos(self) -> list[PluginInfo]:
        """Every plugin seen: loaded, failed or blocked, with its backends."""
        _ = self.pm  # load the plugins
        backends_by_plugin: dict[str, list[str]] = {}
        hardware_by_plugin: dict[str, dict] = {}
        try:
            for backend in self.backends(include_unavailable=True).values():
                backends_by_plugin.setdefault(backend.plugin, []).append(backend.name)
                facts = self._hardware_of(backend)
                if facts:
                    hardware_by_plugin.setdefault(backend.plugin, {})[backend.name] = facts
        except PluginError:
            pass
        return [
            attrs.evolve(
                info,
                backends=tuple(sorted(backends_by_plugin.get(info.name, ()))),
                hardware=hardware_by_plugin.get(info.name, {}),
            )
            for info in self._infos.values()
        ]

    @staticmethod
    def _hardware_of(backend: Backend) -> dict:
        """``backend.hardware()`` if the backend can run here; a failing probe is shown, not raised."""
        if backend.is_available() is not None:
            return {}
        try:
            return dict(backend.hardware())
        except Exception as exc:  # a probe must not take the listing down
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _distribution_of(self, plugin_name: str) -> str:
        info = self._infos.get(plugin_name)
        return info.distribution if info else "?"

    # ------------------------------------------------------------------ calling hooks
    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook_name`` through pluggy, one plugin at a time.

        The order is qcore's: the core's own implementation first, then by plugin name (pluggy's
        LIFO order would depend on installation order). Each call goes through pluggy's hook
        executor (``HookCaller._hookexec``, what ``pm.hook.<name>(...)`` runs, given one
        plugin's implementations and every wrapper), so an implementation may take fewer arguments than the spec (pluggy passes only
        the ones it names), and hook wrappers, tracing and monitoring apply. Returns
        ``(plugin name, result)`` for each implementation that returned something other than None.
        """
        caller = getattr(self.pm.hook, hook_name)
        every_impl = caller.get_hookimpls()  # pluggy's order: plain implementations, then wrappers
        plugins = sorted(
            {impl.plugin_name: impl.plugin for impl in every_impl if not (impl.hookwrapper or impl.wrapper)}.items(),
            key=lambda item: (item[0] != "qcore", item[0]),
        )
        results: list[tuple[str, Any]] = []
        for plugin_name, plugin in plugins:
            # this plugin's implementations and every wrapper, in pluggy's order, run by the same
            # executor as ``pm.hook.<name>(...)`` (so monitoring and tracing see the call too)
            impls = [impl for impl in every_impl if impl.plugin is plugin or impl.hookwrapper or impl.wrapper]
            for result in caller._hookexec(caller.name, impls, kwargs, False):
                results.append((plugin_name, result))
        return results

    def records(self, hook_name: str, record_type: "type[Any]", **kwargs: Any) -> list:
        """The records every plugin returns from ``hook_name``, checked and stamped with their plugin."""
        found = []
        for plugin_name, returned in self.call_each(hook_name, **kwargs):
            for record in returned or ():
                if not isinstance(record, record_type):
                    raise PluginError(
                        f"plugin {plugin_name!r} returned {record!r} from {hook_name}; "
                        f"expected qcore.{record_type.__name__} records"
                    )
                found.append(attrs.evolve(record, plugin=plugin_name))
        return found

    # ------------------------------------------------------------------ backends
    def backends(self, include_unavailable: bool = False) -> dict[str, Backend]:
        """Backend name -> record, for every backend the loaded plugins register."""
        with self._lock:
            if self._backends is None:
                found: dict[str, Backend] = {}
                for record in self.records("qcore_register_backends", Backend):
                    record = attrs.evolve(record, distribution=self._distribution_of(record.plugin))
                    if record.name in found:
                        other = found[record.name]
                        raise PluginError(
                            f"backend {record.name!r} is registered twice: by distribution "
                            f"{other.distribution!r} (plugin {other.plugin!r}) and by distribution "
                            f"{record.distribution!r} (plugin {record.plugin!r}); uninstall or "
                            f"block one of them with {BLOCK_ENV}"
                        )
                    found[record.name] = record
                self._backends = found
            if include_unavailable:
                return dict(self._backends)
            return {name: b for name, b in self._backends.items() if b.is_available() is None}

    def get_backend(self, name: str) -> Backend:
        """The backend record for ``name``; an unknown or unavailable name is a clear error."""
        everything = self.backends(include_unavailable=True)
        backend = everything.get(name)
        if backend is not None:
            reason = backend.is_available()
            if reason is None:
                return backend
            from qcore.errors import BackendUnavailableError

            raise BackendUnavailableError(f"backend {name!r} is installed but unavailable here: {reason}")
        installed = sorted(n for n, b in everything.items() if b.is_available() is None)
        unavailable = [f"{n} ({b.is_available()})" for n, b in sorted(everything.items()) if b.is_available() is not None]
        message = f"unknown backend {name!r}; installed backends: {', '.join(installed) or 'none'}"
        if unavailable:
            message += f"; installed but unavailable: {'; '.join(unavailable)}"
        failed = [i.name for i in self._infos.values() if i.status == "failed"]
        if failed:
            message += f"; plugins that failed to load: {', '.join(failed)} (see `qcore plugins`)"
        raise UnknownBackendError(message)

    # ------------------------------------------------------------------ the four hooks
    def annotators(self, backend: str) -> list[Annotator]:
        """Every annotator the plugins contribute for ``backend``, in qcore's run order."""
        return sorted(self.records("annotate_op", Annotator, backend=backend), key=lambda a: a.order_key)

    def fuse_qat(self, model: Any) -> bool:
        """Run every ``fuse_qat`` implementation: the core's first, then by plugin name."""
        return any([bool(changed) for _, changed in self.call_each("fuse_qat", model=model, is_qat=True)])

    def insert_observers(self, model: Any, is_qat: bool, obs_or_fq_callback: Any = None) -> Any:
        """The first ``insert_observers`` implementation that returns a model decides."""
        result = self.pm.hook.insert_observers(model=model, is_qat=is_qat, obs_or_fq_callback=obs_or_fq_callback)
        if result is None:
            raise PluginError("no plugin inserted observers (is the core plugin blocked?)")
        return result

    def algorithms(self) -> dict[str, Algorithm]:
        """Every accuracy algorithm the plugins register, by name (the core's first)."""
        found: dict[str, Algorithm] = {}
        for record in self.records("qcore_register_algorithms", Algorithm):
            if record.name in found:
                raise PluginError(
                    f"algorithm {record.name!r} is registered by both plugin {found[record.name].plugin!r} "
                    f"and plugin {record.plugin!r}"
                )
            found[record.name] = record
        return found

    def lowering_passes(self, backend: str) -> list[LoweringPass]:
        """Every lowering pass for ``backend``, ordered so each runs after what it declares."""
        found: dict[str, LoweringPass] = {}
        for record in self.records("lower_pattern", LoweringPass, backend=backend):
            if record.name in found:
                raise PluginError(
                    f"lowering pass {record.name!r} for backend {backend!r} is declared by both "
                    f"plugin {found[record.name].plugin!r} and plugin {record.plugin!r}"
                )
            found[record.name] = record
        return order_after(found)


def order_after(passes: dict[str, LoweringPass]) -> list[LoweringPass]:
    """Topological order over ``after`` (names not present are ignored); ties by name."""
    remaining = dict(sorted(passes.items()))
    ordered: list[LoweringPass] = []
    done: set[str] = set()
    while remaining:
        ready = [p for p in remaining.values() if all(a in done or a not in passes for a in p.after)]
        if not ready:
            cycle = ", ".join(f"{p.name} (after {', '.join(p.after)})" for p in remaining.values())
            raise PluginError(f"lowering passes wait on each other in a cycle: {cycle}")
        first = ready[0]
        ordered.append(first)
        done.add(first.name)
        del remaining[first.name]
    return ordered


def _spec_names() -> list[str]:
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "qcore_spec")]


def _hook_names_of(pm: pluggy.PluginManager, module: Any) -> Iterable[str]:
    for attr in dir(module):
        opts = pm.parse_hookimpl_opts(module, attr)
        if opts is not None:
            yield opts.get("specname") or attr


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        from qcore import __version__

        return __version__


_MANAGER: Optional[QcorePluginManager] = None
_MANAGER_LOCK = threading.Lock()


def get_plugin_manager() -> QcorePluginManager:
    """The process-wide plugin manager (created, not loaded, on first call)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            _MANAGER = QcorePluginManager()
        return _MANAGER


def set_plugin_manager(manager: Optional[QcorePluginManager]) -> Optional[QcorePluginManager]:
    """Replace the process-wide manager (tests); returns the previous one. None resets it."""
    global _MANAGER
    with _MANAGER_LOCK:
        previous, _MANAGER = _MANAGER, manager
        return previous
