"""Evaluation: benchmark scoring through SGLang + math-verify (``srft-eval`` and in-training evaluation)."""
