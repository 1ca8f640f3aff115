"""``python -m automammo`` is the ``automammo`` command."""

from automammo.cli import main

main()
