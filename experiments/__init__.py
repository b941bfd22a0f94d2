"""Small-scale experiments that test published claims with the mojax trainer (see experiments/README.md)."""
