"""What an importer plugin provides: a data source turned into ``dataset.npz``.

An importer contributes one ``automammo data NAME`` subcommand. The command object is a
``click.Command`` built by the plugin (the core never imports click); it should raise
``automammo.errors.DataError`` with a message that names the offending file, write its
output with ``Dataset.save`` (atomic), and print a short summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Importer:
    """A registered data source.

    Attributes:
        name: the subcommand, e.g. ``import-cbis``.
        description: one line for ``automammo plugins``.
        command: a ``click.Command`` whose name equals ``name``.
    """

    name: str
    description: str
    command: Any
