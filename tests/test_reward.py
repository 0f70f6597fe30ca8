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
