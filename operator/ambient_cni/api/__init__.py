"""The AmbientNodeConfig API: models (the single source of truth), names and the CRD."""
