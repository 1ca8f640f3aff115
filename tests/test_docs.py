"""The docs cover every hook and every CLI command; a new one without docs fails here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import click

from automammo import hookspecs, registry
from automammo.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _all_docs() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def _commands(group: click.Group, prefix: str = "automammo"):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        path = f"{prefix} {name}"
        yield path
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)


def test_every_hook_is_documented_with_its_signature():
    text = (DOCS / "plugins.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("automammo_")]
    assert hooks
    for hook in hooks:
        assert re.search(rf"#+ `{hook}\(\) -> ", text), f"docs/plugins.md lacks a section for {hook}"


def test_every_cli_command_is_documented():
    text = _all_docs()
    commands = list(_commands(cli))
    assert "automammo search" in commands and "automammo data synth" in commands
    missing = [c for c in commands if c not in text]
    assert not missing, f"commands missing from docs/: {missing}"


def test_every_builtin_objective_and_builder_is_documented():
    text = _all_docs()
    for kind in ("objective", "builder", "meta-learner", "importer"):
        for name, r in registry.registered(kind).items():
            if r.package == "automammo":
                assert f"`{name}`" in text or f"`automammo data {name}" in text, f"{kind} {name} is not in docs/"


def test_readme_links_resolve():
    readme = (DOCS.parent / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (DOCS.parent / target).exists(), f"README links to missing {target}"
