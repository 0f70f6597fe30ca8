import threading

import pytest

from srft_mcore import reward
from srft_mcore.reward import (RewardError, extract_boxed, get_reward_fn, math_reward,
                               score_batch)
from srft_mcore.reward import math_answer as reward_math


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{16}.", "16"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed 7 apples", "7"),
    ("\\fbox{x}", "x"),
    ("no box here", None),
    ("\\boxed{3", None),
    ("\\boxed{1} and a broken \\boxed{2", "1"),
    ("\\boxedx{3}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("<think> 5 + 3 = 8 </think> \\boxed{8}", "8", 1.0),
    ("\\boxed{9}", "8", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{x + 1}", "1+x", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{2}", "\\boxed{2}", 1.0),
    ("the answer is 8", "8", 0.0),
    ("", "8", 0.0),
    ("\\boxed{}", "8", 0.0),
    ("\\boxed{{{{((( \\frac", "8", 0.0),
    ("\\boxed{\\frac{1}{0}}", "1", 0.0),
])
def test_math_reward(response, answer, expected):
    assert math_reward(response, answer, None) == expected


def test_math_reward_garbage_inputs_never_raise():
    assert math_reward(None, "1", None) == 0.0
    assert math_reward("\\boxed{1}", None, None) == 0.0
    assert math_reward("\\boxed{" + "(" * 500 + "}", "1", None) == 0.0


def test_exact_match_fast_path_skips_math_verify(monkeypatch):
    def boom(gold, pred):
        raise AssertionError("math-verify must not run on an exact match")
    monkeypatch.setattr(reward_math, "_verify", boom)
    assert math_reward("\\boxed{ 42 }", "$42$", None) == 1.0
    # a non-exact pair goes to math-verify, whose failure scores 0 instead of raising
    assert math_reward("\\boxed{0.5}", "\\frac12", None) == 0.0


def test_timeout_scores_zero(monkeypatch):
    from math_verify.errors import TimeoutException

    def slow(gold, pred):
        raise TimeoutException("Operation timed out!")
    monkeypatch.setattr(reward_math, "_verify", slow)
    assert math_reward("\\boxed{0.5}", "\\frac{1}{2}", None) == 0.0


def test_math_reward_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{0.5}", "\\frac{1}{2}")))
    t.start()
    t.join(30)
    assert out == [1.0]


def test_registry_and_module_function(tmp_path, monkeypatch):
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn(None) is math_reward
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_reward(response, answer, prompt):\n"
        "    return float(len(response) == int(answer))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward_fn("my_rewards_mod:length_reward")
    assert score_batch(fn, ["abc", "ab"], ["3", "3"], ["p", "q"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec, fragment", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("srft_mcore.reward:no_such_fn", "has no attribute 'no_such_fn'"),
    ("srft_mcore.reward:REWARDS", "not a callable"),
    ("unknown_reward", "not a registered reward"),
])
def test_bad_reward_spec_errors(spec, fragment):
    with pytest.raises(RewardError, match=fragment):
        get_reward_fn(spec)


def test_register_reward():
    def const(response, answer, prompt):
        return 0.25
    reward.register_reward("const_test", const)
    try:
        assert get_reward_fn("const_test") is const
        with pytest.raises(RewardError, match="already registered"):
            reward.register_reward("const_test", lambda r, a, p: 0.0)
    finally:
        reward.REWARDS.pop("const_test")


def test_score_batch_checks():
    assert score_batch(math_reward, ["\\boxed{1}", "x", "\\boxed{0.5}"],
                       ["1", "1", "\\frac{1}{2}"]) == [1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="2 responses but 1 answers"):
        score_batch(math_reward, ["a", "b"], ["1"])
    with pytest.raises(RewardError, match="sample 1"):
        score_batch(lambda r, a, p: 1 / 0 if r == "b" else 1.0, ["a", "b"], ["1", "1"])
    with pytest.raises(RewardError, match="expected a float"):
        score_batch(lambda r, a, p: "yes", ["a"], ["1"])
    with pytest.raises(RewardError, match="finite"):
        score_batch(lambda r, a, p: float("nan"), ["a"], ["1"])


# --------------------------------------------------------------------------- the reward pool
# Worker processes that score by spec with a per-answer time limit (srft_mcore/reward/pool.py).
# The functions live in tests/hanging_rewards.py, importable by spec in a worker.
def _alive(pid: int) -> bool:
    """Running (a dead child not yet reaped by its new parent counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def hang_pool():
    from srft_mcore.reward.pool import RewardPool

    logs = []
    pool = RewardPool("hanging_rewards:hang_on", workers=2, timeout_s=1.5, log=logs.append)
    pool.logs = logs
    yield pool
    pool.close()


def test_pool_hanging_answer_scores_zero_counted_and_the_pool_goes_on(hang_pool):
    import threading

    before = hang_pool.pids()
    assert len(before) == 2
    box = {}
    # the call must return at all (the hang lasts forever): a thread keeps a broken pool
    # from stalling the suite, with a bound far above any machine's speed
    th = threading.Thread(target=lambda: box.update(out=hang_pool.score(
        ["1", "hang", "2", "x", "3"], ["1", "1", "2", "2", "3"])), daemon=True)
    th.start()
    th.join(600)
    assert "out" in box, "score() did not return: the hanging answer was not timed out"
    scores, timeouts = box["out"]
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert timeouts == 1 and hang_pool.timeouts_total == 1
    assert len(hang_pool.logs) == 1 and "sample 1" in hang_pool.logs[0]
    # the stuck worker was killed and replaced; the next batch scores normally
    after = hang_pool.pids()
    assert len(after) == 2 and len(set(before) & set(after)) == 1
    assert not any(_alive(p) for p in set(before) - set(after))
    assert hang_pool.score(["a", "b", "c"], ["a", "x", "c"]) == ([1.0, 0.0, 1.0], 0)
    # every worker stuck at once: each answer still costs at most its limit
    scores, timeouts = hang_pool.score(["hang", "hang", "y"], ["1", "1", "y"])
    assert (scores, timeouts) == ([0.0, 0.0, 1.0], 2)
    assert hang_pool.timeouts_total == 3


def test_pool_hang_handled_off_the_main_thread(hang_pool):
    """rollout.overlap scores in a background thread, where SIGALRM cannot be used."""
    out = []
    t = threading.Thread(target=lambda: out.append(hang_pool.score(["hang", "ok"], ["", "ok"])))
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert out == [([0.0, 1.0], 1)]
    # the replacement was started from that (now finished) thread's call: it lives on
    assert len(hang_pool.pids()) == 2
    assert hang_pool.score(["ok"], ["ok"]) == ([1.0], 0)


def test_pool_kills_a_hang_inside_c_code():
    from srft_mcore.reward.pool import RewardPool

    with RewardPool("hanging_rewards:backtrack_on", workers=1, timeout_s=1) as pool:
        assert pool.score(["ok", "backtrack", "ok"], ["", "", ""]) == ([1.0, 0.0, 1.0], 1)


def test_pool_truncated_responses_are_not_sent(hang_pool):
    # a response sent to a worker would hang until the timeout and be counted (the 0 below)
    assert hang_pool.score(["hang", "hang", "z"], ["1", "1", "z"],
                           finish_reasons=["length", "length", "stop"]) == ([0.0, 0.0, 1.0], 0)
    assert hang_pool.timeouts_total == 0
    assert hang_pool.logs == []


def test_pool_raising_or_non_numeric_functions_fail_loudly_with_the_index():
    from srft_mcore.reward.pool import RewardPool

    with RewardPool("hanging_rewards:raise_on_bad", workers=2, timeout_s=5) as pool:
        with pytest.raises(RewardError, match=r"raised on sample 2 \(ValueError: bad response"):
            pool.score(["ok", "ok", "bad", "ok", "ok"], ["1"] * 5)
        assert pool.score(["ok", "ok"], ["1", "1"]) == ([1.0, 1.0], 0)  # still usable
        # the first failing sample is named, whichever worker reported first
        with pytest.raises(RewardError, match="sample 1 "):
            pool.score(["ok", "bad", "bad", "bad"], ["1"] * 4)
        with pytest.raises(RewardError, match="score_batch: 2 responses but 1 answers"):
            pool.score(["a", "b"], ["1"])
    with RewardPool("hanging_rewards:not_a_number", workers=1, timeout_s=5) as pool:
        with pytest.raises(RewardError, match="returned 'yes' for sample 0; expected a float"):
            pool.score(["word"], ["1"])
        with pytest.raises(RewardError, match="returned nan for sample 0; expected a finite"):
            pool.score(["other"], ["1"])


def test_pool_math_reward_equals_in_process_scoring():
    from srft_mcore.reward.pool import RewardPool

    responses = ["\\boxed{0.5}", "\\boxed{9}", "\\boxed{x + 1}", "the answer is 8",
                 "\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{{{{((( \\frac", "\\boxed{3}"]
    answers = ["\\frac{1}{2}", "8", "1+x", "8", "\\frac{1}{\\sqrt{2}}", "8", "3"]
    finish = ["stop"] * 6 + ["length"]
    want = score_batch(math_reward, responses, answers, None, finish)
    assert want == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    with RewardPool("math", workers=2, timeout_s=10) as pool:
        assert pool.score(responses, answers, None, finish) == (want, 0)


def test_pool_close_leaves_no_child_processes():
    from srft_mcore.reward.pool import RewardPool

    pool = RewardPool("hanging_rewards:hang_on", workers=2, timeout_s=1)
    pids = pool.pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    pool.close()
    pool.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    assert pool.pids() == []
    with pytest.raises(RewardError, match="closed"):
        pool.score(["a"], ["a"])


def test_pool_workers_die_with_their_parent(tmp_path):
    """A trainer killed with SIGKILL runs no close(): the workers must still go."""
    import os
    import subprocess
    import sys
    import time

    code = ("import sys, threading, time\n"
            "from srft_mcore.reward.pool import RewardPool\n"
            "box = {}\n"
            "t = threading.Thread(target=lambda: box.update(p=RewardPool("
            "'hanging_rewards:hang_on', workers=2, timeout_s=100)))\n"
            "t.start(); t.join()  # made in a thread that has ended: PDEATHSIG still holds\n"
            "print(*box['p'].pids(), flush=True)\n"
            "threading.Thread(target=box['p'].score, args=(['hang', 'hang'], ['', ''])).start()\n"
            "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.5)
        assert all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 120  # ends as soon as they are gone
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_runtime_registered_reward_falls_back_to_in_process_scoring():
    """A fresh worker does not run the parent's register_reward: scored in-process, said."""
    from srft_mcore.reward.pool import open_pool

    reward.register_reward("runtime_only_test", lambda r, a, p: 0.5)
    try:
        logs = []
        assert open_pool("runtime_only_test", 2, 1.0, log=logs.append) is None
        assert len(logs) == 1
        assert "cannot resolve" in logs[0] and "reward.fn=module:function" in logs[0]
    finally:
        reward.REWARDS.pop("runtime_only_test")
    assert open_pool("math", 0, 1.0) is None  # workers=0: in-process by choice
    with pytest.raises(RewardError, match="not a registered reward"):  # wrong everywhere
        open_pool("no_such_reward_xyz", 2, 1.0)


def test_reward_config_defaults_and_validation():
    from srft_mcore.config import ConfigError, load_config, validate

    cfg = load_config(None, [])
    assert (cfg.reward.workers, cfg.reward.timeout_s) == (2, 10.0)
    validate(load_config(None, ["reward.workers=0", "reward.timeout_s=2"]))
    with pytest.raises(ConfigError, match=r"reward\.workers=-1: must be >= 0\. Fix: use 0"):
        validate(load_config(None, ["reward.workers=-1"]))
    for bad in ("0", "-1", ".inf"):
        with pytest.raises(ConfigError, match=r"reward\.timeout_s=.*must be a finite number "
                                              r"> 0\. Fix:"):
            validate(load_config(None, [f"reward.timeout_s={bad}"]))


# --------------------------------------------------------------------------- RolloutSide wiring
def _side(overrides, rank=0):
    from types import SimpleNamespace

    from srft_mcore.config import load_config
    from srft_mcore.training.rollout_side import RolloutSide

    cfg = load_config(None, ["reward.fn=hanging_rewards:hang_on", "reward.timeout_s=1.5",
                             "rollout.n_samples=2", "train.steps=3", *overrides])
    return RolloutSide(cfg, SimpleNamespace(rank=rank, cpu_group=None), tokenizer=None,
                       dataset=None, sampler=None, reward_fn=get_reward_fn(cfg.reward.fn))


def _completion(text, finish="stop"):
    from srft_mcore.rollout.client import Completion

    return Completion(token_ids=[1, 2], text=text, logprobs=[], finish_reason=finish)


def test_rollout_side_scores_through_the_pool_and_counts_timeouts():
    from types import SimpleNamespace

    side = _side([])
    try:
        assert side.reward_pool is not None and len(side.reward_pool.pids()) == 2
        examples = [SimpleNamespace(answer="a", prompt="p"), SimpleNamespace(answer="b",
                                                                             prompt="q")]
        groups = [[_completion("a"), _completion("hang")],
                  [_completion("b"), _completion("hang", "length")]]
        out = []
        t = threading.Thread(target=lambda: out.append(side.score_counted(examples, groups)))
        t.start()  # as rollout.overlap's background thread does
        t.join(30)
        assert out == [([[1.0, 0.0], [1.0, 0.0]], 1)]
        assert side.score(examples, [[_completion("b")], [_completion("b")]]) == [[0.0], [1.0]]
        pids = side.reward_pool.pids()
    finally:
        side.close()
    assert side.reward_pool is None and not any(_alive(p) for p in pids)
    side.close()  # idempotent (the trainer's close after an error)
    # workers=0: in this process, as before; other ranks run no pool and score nothing
    side = _side(["reward.workers=0"])
    assert side.reward_pool is None
    assert side.score_counted([SimpleNamespace(answer="a", prompt="p")],
                              [[_completion("a"), _completion("c")]]) == ([[1.0, 0.0]], 0)
    other = _side([], rank=1)
    assert other.reward_pool is None and other.score_counted([], []) == (None, 0)


def test_overlapped_batch_carries_its_timeout_count_to_the_step_metric():
    """rollout.overlap: the next step's batch is scored in the background thread; its
    timeouts are logged with the step that trains on it (reward/timeouts)."""
    from types import SimpleNamespace

    side = _side(["rollout.overlap=true", "train.steps=2"])  # next_batch(1): no more ahead
    texts = {0: ["x", "hang"], 1: ["y", "y"]}  # prompt 0's second sample hangs
    examples = {0: SimpleNamespace(answer="x", prompt="p0", prompt_ids=[1]),
                1: SimpleNamespace(answer="y", prompt="p1", prompt_ids=[2])}
    draws = iter([[1], [0]])

    def generate(prompt_ids, n, sampling, return_logprob):
        return [[_completion(t) for t in texts[ids[0] - 1]] for ids in prompt_ids]

    side.sampler = SimpleNamespace(next_batch=lambda: next(draws))
    side.dataset = SimpleNamespace(batch=lambda idx: [examples[i] for i in idx])
    side.tokenizer = SimpleNamespace(eos_token_id=0)
    side.engine = SimpleNamespace(client=SimpleNamespace(generate=generate),
                                  generate=generate, _check_versions=lambda groups: None)
    try:
        indices, groups, rewards = side.next_batch(0)  # now; prompt 0 starts in the background
        assert (indices, rewards) == ([1], [[1.0, 1.0]])
        assert side.reward_metrics() == {"reward/timeouts": 0}
        side.finish_ahead()
        assert side.reward_metrics() == {"reward/timeouts": 0}  # still this step's count
        indices, groups, rewards = side.next_batch(1)  # the overlapped batch
        assert (indices, rewards) == ([0], [[1.0, 0.0]])
        assert side.reward_metrics() == {"reward/timeouts": 1}
    finally:
        side.close()
