"""Engine-specific options and launchers: one module per engine."""
