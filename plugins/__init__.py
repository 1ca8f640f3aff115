"""Built-in automammo plugins, registered through the same hooks as any third party."""
