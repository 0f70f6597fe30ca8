"""Run a command-line tool's ``main(argv)`` inside the test process.

Its ranks (launching/local.py) then fork from the test worker's warm fork server instead of
a new interpreter importing torch and megatron-core first, seconds per call. Each tool keeps
one test that runs it as a command, for its entry point and exit status.
"""
import contextlib
import io
import os
import warnings


def run_main(main, args):
    """``(exit status, stdout, stderr)`` of ``main(list(args))``. The warnings filter and
    the environment defaults such mains set (PYTHONWARNINGS for their ranks, ...) are
    undone afterwards."""
    out, err = io.StringIO(), io.StringIO()
    env = dict(os.environ)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        for key in set(os.environ) - set(env):
            del os.environ[key]
        os.environ.update(env)
    return rc, out.getvalue(), err.getvalue()
