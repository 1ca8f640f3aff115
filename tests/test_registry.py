"""The plugin host: hooks, registries, duplicate names, broken plugins, `automammo plugins`."""

from __future__ import annotations

import inspect
import json
import sys
import types

import pytest
from click.testing import CliRunner

from automammo import hookimpl, hookspecs, registry
from automammo.cli import cli
from automammo.errors import PluginError, UnknownNameError
from automammo.objectives import Objective


@pytest.fixture
def fresh_host():
    registry.reset()
    yield registry
    registry.reset()


def test_every_hookspec_has_a_registry_kind():
    specs = {n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("automammo_")}
    assert specs == set(registry.KINDS.values())


def test_builtins_arrive_through_the_hooks(fresh_host):
    assert "scratch_cnn" in registry.builders()
    assert {"accuracy", "auc", "f1", "f2", "loss"} <= set(registry.objectives())
    builtins = [r for r in registry.registered("objective").values() if r.module.startswith("automammo_plugins.")]
    assert {r.name for r in builtins} >= {"accuracy", "auc", "f1", "f2", "loss", "sens_at_spec90"}
    for r in builtins:
        assert r.package == "automammo"
        assert r.description


def test_unknown_name_lists_the_known_ones(fresh_host):
    with pytest.raises(UnknownNameError, match="unknown builder 'nope'; known: .*scratch_cnn"):
        registry.get("builder", "nope")


def _fake_entry_point(monkeypatch, name, module_name, dist="thirdparty-pkg"):
    ep = types.SimpleNamespace(name=name, value=module_name, dist=types.SimpleNamespace(name=dist),
                               load=lambda: __import__(module_name, fromlist=["x"]))
    monkeypatch.setattr(registry, "_entry_points", lambda: [ep])


def _objective_plugin(monkeypatch, module_name, register, dist="thirdparty-pkg"):
    """A third-party package whose entry point is a module implementing the objectives hook."""
    mod = types.ModuleType(module_name)
    mod.automammo_register_objectives = hookimpl(register)
    monkeypatch.setitem(sys.modules, module_name, mod)
    _fake_entry_point(monkeypatch, module_name.split("_")[0], module_name, dist=dist)


def test_duplicate_name_names_both_sources(fresh_host, monkeypatch):
    _objective_plugin(monkeypatch, "dup_objective_plugin",
                      lambda: [Objective("auc", "max", lambda *a: 0.0, "a second auc")])
    with pytest.raises(PluginError) as err:
        registry.objectives()
    msg = str(err.value)
    assert "'auc' is registered twice" in msg
    assert "automammo (automammo_plugins.objectives)" in msg
    assert "thirdparty-pkg" in msg


def test_broken_plugin_is_reported_and_the_rest_work(fresh_host, monkeypatch):
    mod_name = "automammo_test_broken_plugin"
    ep = types.SimpleNamespace(name="broken", value=mod_name, dist=types.SimpleNamespace(name="broken-pkg"),
                               load=lambda: (_ for _ in ()).throw(ImportError("No module named 'torchx'")))
    monkeypatch.setattr(registry, "_entry_points", lambda: [ep])
    assert "scratch_cnn" in registry.builders()
    failures = registry.load_failures()
    assert any(f.package == "broken-pkg" and "torchx" in f.error for f in failures)
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert any(f["package"] == "broken-pkg" for f in out["failures"])


def test_hook_that_raises_is_reported(fresh_host, monkeypatch):
    def automammo_register_objectives():
        raise RuntimeError("boom in hook")

    _objective_plugin(monkeypatch, "raising_plugin", automammo_register_objectives, dist="raiser-pkg")
    assert "f2" in registry.objectives()
    assert any(f.package == "raiser-pkg" and "boom in hook" in f.error
               and f.where.endswith("raising_plugin.automammo_register_objectives") for f in registry.load_failures())


def test_a_thing_without_a_name_is_reported_and_the_rest_work(fresh_host, monkeypatch):
    class Unnamed:
        pass

    _objective_plugin(monkeypatch, "unnamed_plugin", lambda: [Unnamed()], dist="unnamed-pkg")
    assert "f2" in registry.objectives()
    failure = next(f for f in registry.load_failures() if f.package == "unnamed-pkg")
    assert "registered an objective without a name" in failure.error and "unnamed_plugin" in failure.where


def test_plugins_command_lists_builders_and_objectives(fresh_host):
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("scratch_cnn", "f2", "auc", "accuracy", "loss"):
        assert name in result.output
    assert "automammo" in result.output


def test_trace_hooks_prints_every_hook_call(fresh_host, monkeypatch, capsys):
    monkeypatch.setenv("AUTOMAMMO_TRACE_HOOKS", "1")
    assert "f2" in registry.objectives()
    err = capsys.readouterr().err
    # pluggy's trace: one call and one result per implementing plugin.
    impls = registry.get_plugin_manager().hook.automammo_register_objectives.get_hookimpls()
    assert err.count("automammo_register_objectives [hook]") == len(impls) >= 1
    assert err.count("finish automammo_register_objectives -->") == len(impls)
    assert "name='f2'" in err


def test_plugin_texts_are_shown_as_written_not_as_markup(fresh_host, monkeypatch):
    _objective_plugin(monkeypatch, "bracket_plugin",
                      lambda: [Objective("bracketed", "max", lambda *a: 0.0, "mean of [a,b,a-b,a*b] per [/x] row")])
    result = CliRunner().invoke(cli, ["plugins"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "mean of [a,b,a-b,a*b] per [/x] row" in result.output
