"""Region features, pixels and detector-feature files: what a model sees of an image (no torch needed for regions)."""
