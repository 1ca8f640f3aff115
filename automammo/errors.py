"""Errors that reach the user.

An ``AutomammoError`` is the user's to fix (bad file, unknown name, ...): the CLI prints its
one-line message and exits with code 2. Anything else is a bug and keeps its traceback.
"""


class AutomammoError(Exception):
    """A problem the user can fix; the message is one line that names what was wrong."""


class DataError(AutomammoError):
    """A data file is missing, malformed or unsuitable for the task."""


class UnknownNameError(AutomammoError):
    """A task, builder, objective, meta-learner or importer name that nobody registered."""

    def __init__(self, kind: str, name: str, known):
        known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known) or '(none)'}")
        self.kind, self.name, self.known = kind, name, known


class PluginError(AutomammoError):
    """Two plugins claim one name, or a plugin returned something unusable."""


class RunError(AutomammoError):
    """A run directory cannot be used as asked (exists, incompatible, incomplete)."""


class BundleError(AutomammoError):
    """A bundle is incomplete, tampered with, or of an unknown format."""
