"""Built-in plugins. Each registers in ``setup.cfg`` exactly as a third-party plugin would."""
