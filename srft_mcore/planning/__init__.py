"""Planning: ``srft-plan`` (layouts that fit, speed and memory estimates) and scaling-study tables."""
