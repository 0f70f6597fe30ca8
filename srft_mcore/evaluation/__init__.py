"""Evaluation: benchmark scoring through SGLang + math-verify (``srft-eval`` and in-training
evaluation).

``records`` reads benchmark files into evaluation sets, ``scoring`` scores responses,
``runner`` generates through running servers (``evaluate_splits`` for training), ``models``
turns ``--model`` into a directory SGLang can serve, ``cli`` is ``srft-eval``.
"""
