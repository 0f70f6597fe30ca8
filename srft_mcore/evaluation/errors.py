"""The error raised for bad evaluation input (model, data, options), shared by every stage of
``srft-eval`` so the CLI reports them all the same way."""


class EvalError(ValueError):
    """Bad input to the evaluation (model, data, options); the message ends with the fix."""
