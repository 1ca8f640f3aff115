"""automammo: AutoML for mammography abnormality patches.

A plugin's only import is ``from automammo import hookimpl``.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("automammo")

__all__ = ["hookimpl", "__version__"]
