"""Reward functions for the reward pool's tests, importable by spec in a fresh worker process
(``hanging_rewards:hang_on``: pytest puts this directory on ``sys.path``, and a pool's workers
take the parent's ``sys.path``)."""
import time


def hang_on(response, answer, prompt):
    """Never returns for the response ``hang`` (nothing interrupts a sleep loop but a kill);
    otherwise 1.0 for an exact match."""
    if response == "hang":
        while True:
            time.sleep(60)
    return float(response == answer)


def raise_on_bad(response, answer, prompt):
    if response == "bad":
        raise ValueError("bad response")
    return 1.0


def not_a_number(response, answer, prompt):
    return "yes" if response == "word" else float("nan")


def backtrack_on(response, answer, prompt):
    """For the response ``backtrack``: a regex match that runs for ages inside C, holding the
    GIL (no signal handler or other thread of the worker runs: only a kill stops it)."""
    import re

    if response == "backtrack":
        re.match(r"(a+)+$", "a" * 64 + "b")
    return 1.0
