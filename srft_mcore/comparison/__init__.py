"""Comparison: ``srft-compare``, SRFT against its baselines and ablations on one budget."""
