"""An example third-party automammo plugin package."""
