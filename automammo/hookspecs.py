"""Every hook automammo calls. A plugin implements any of them with ``@hookimpl``."""

import pluggy

hookspec = pluggy.HookspecMarker("automammo")


@hookspec
def automammo_register_builders():
    """Return a list of builder classes (``automammo.builders.Builder`` subclasses)."""


@hookspec
def automammo_register_objectives():
    """Return a list of ``automammo.objectives.Objective`` instances."""


@hookspec
def automammo_register_meta_learners():
    """Return a list of meta-learner classes (``automammo.meta.MetaLearner`` subclasses)."""


@hookspec
def automammo_register_importers():
    """Return a list of ``automammo.importers.Importer`` instances (data sources)."""
