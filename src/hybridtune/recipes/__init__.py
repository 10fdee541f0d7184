"""End-to-end recipes built from hybridtune's components (the CLI calls these)."""
