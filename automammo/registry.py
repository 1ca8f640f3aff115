"""The plugin manager and the name -> thing tables built from its hooks.

Built-ins are registered from ``BUILTIN_PLUGINS`` through the same hooks a third party
uses; third parties arrive through the entry-point group ``automammo``. A plugin that fails
to import, or whose hook raises, is recorded in ``load_failures()`` and skipped.
Set ``AUTOMAMMO_TRACE_HOOKS=1`` to print every hook call.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from automammo import hookspecs
from automammo.errors import PluginError, UnknownNameError

ENTRY_POINT_GROUP = "automammo"

BUILTIN_PLUGINS = (
    "automammo_plugins.objectives",
    "automammo_plugins.scratch_cnn",
    "automammo_plugins.transfer",
    "automammo_plugins.fusion",
    "automammo_plugins.meta_learners",
    "automammo_plugins.phantom",
    "automammo_plugins.course_arrays",
    "automammo_plugins.cbis",
    "automammo_plugins.mias",
    "automammo_plugins.image_folder",
)

KINDS = {
    "builder": "automammo_register_builders",
    "objective": "automammo_register_objectives",
    "meta-learner": "automammo_register_meta_learners",
    "importer": "automammo_register_importers",
}


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be used: which package, which module or hook, what error."""

    package: str
    where: str
    error: str


@dataclass(frozen=True)
class Registered:
    """One registered thing with the package and module it came from."""

    name: str
    obj: Any
    package: str
    module: str

    @property
    def description(self) -> str:
        return str(getattr(self.obj, "description", "")).strip()


class _PluginHost:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("automammo")
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[LoadFailure] = []
        self.packages: dict[str, str] = {}  # plugin name -> distribution
        for module_name in BUILTIN_PLUGINS:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name == module_name:  # not shipped in this build: nothing to report
                    continue
                self._fail("automammo", module_name, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the host
                self._fail("automammo", module_name, exc)
                continue
            self.pm.register(module, name=module_name)
            self.packages[module_name] = "automammo"
        for ep in _entry_points():
            package = ep.dist.name if ep.dist is not None else ep.value
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001
                self._fail(package, f"{ep.name} = {ep.value}", exc)
                continue
            if self.pm.is_registered(plugin):
                continue
            try:
                self.pm.register(plugin, name=f"{package}:{ep.name}")
            except ValueError as exc:
                self._fail(package, ep.name, exc)
                continue
            self.packages[f"{package}:{ep.name}"] = package
        self.pm.check_pending()
        if os.environ.get("AUTOMAMMO_TRACE_HOOKS"):
            self.pm.trace.root.setwriter(lambda line: print(line, end="", file=sys.stderr))
            self.pm.enable_tracing()

    def _fail(self, package: str, where: str, exc: BaseException) -> None:
        self.failures.append(LoadFailure(package, where, f"{type(exc).__name__}: {exc}"))

    @functools.cache
    def table(self, kind: str) -> dict[str, Registered]:
        hook = getattr(self.pm.hook, KINDS[kind])
        found: dict[str, Registered] = {}
        impls = hook.get_hookimpls()
        # Call each implementation on its own so that one broken plugin is reported and
        # skipped, and every result keeps the package it came from; through a pluggy
        # caller, so that AUTOMAMMO_TRACE_HOOKS sees the call.
        for impl in reversed(impls):
            package = self.packages.get(impl.plugin_name, impl.plugin_name)
            others = [other.plugin for other in impls if other is not impl]
            module = getattr(impl.plugin, "__name__", impl.plugin_name)
            where = f"{module}.{KINDS[kind]}" if module == impl.plugin_name else \
                f"{impl.plugin_name}: {module}.{KINDS[kind]}"
            try:
                results = self.pm.subset_hook_caller(KINDS[kind], remove_plugins=others)()
                items = (results[0] if results else None) or []
            except Exception as exc:  # noqa: BLE001
                self._fail(package, where, exc)
                continue
            for item in items:
                name = getattr(item, "name", None)
                if not isinstance(name, str) or not name:
                    # Reported and skipped, like a hook that raises: the rest keep working.
                    article = "an" if kind[0] in "aeiou" else "a"
                    self._fail(package, where, PluginError(f"registered {article} {kind} without a name: {item!r}"))
                    continue
                if name in found:
                    first = found[name]
                    raise PluginError(
                        f"{kind} {name!r} is registered twice: by {first.package} ({first.module}) "
                        f"and by {package} ({impl.plugin_name})"
                    )
                found[name] = Registered(name, item, package, impl.plugin_name)
        return found


def _entry_points():
    if os.environ.get("AUTOMAMMO_NO_ENTRY_POINTS"):
        return []
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


@functools.cache
def _host() -> _PluginHost:
    return _PluginHost()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    return _host().pm


def reset() -> None:
    """Forget the plugin manager so the next call rebuilds it (tests, new installs)."""
    _host.cache_clear()


def load_failures() -> list[LoadFailure]:
    """Plugins that failed to import or whose hooks raised, in the order met."""
    host = _host()
    for kind in KINDS:
        host.table(kind)
    return list(host.failures)


def registered(kind: str) -> dict[str, Registered]:
    """Name -> ``Registered`` for one kind: builder, objective, meta-learner or importer."""
    return _host().table(kind)


def get(kind: str, name: str) -> Any:
    """The registered object called ``name``; an unknown name lists the known ones."""
    table = registered(kind)
    if name not in table:
        raise UnknownNameError(kind, name, table)
    return table[name].obj


def builders() -> dict[str, Any]:
    return {n: r.obj for n, r in registered("builder").items()}


def objectives() -> dict[str, Any]:
    return {n: r.obj for n, r in registered("objective").items()}


def meta_learners() -> dict[str, Any]:
    return {n: r.obj for n, r in registered("meta-learner").items()}


def importers() -> dict[str, Any]:
    return {n: r.obj for n, r in registered("importer").items()}
