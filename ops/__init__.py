"""Op families: one module each. `registry.FAMILIES` maps an op kind to its family."""
