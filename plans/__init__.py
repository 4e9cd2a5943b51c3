"""The plan: schema, YAML I/O, fingerprints, the memory model, show/verify/diff."""
