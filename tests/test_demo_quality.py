"""data.demo_quality (wrong, truncated and replaced demonstrations) and data.verify_demos:
the corruption's format, counts and seeding, its independence from the method, the source
file's matching and errors, and the demonstration's reward in its group (Eq. 7)."""
import json
import math
import random
import re
from types import SimpleNamespace

import pytest

from srft_mcore.config import (AlgorithmConfig, ConfigError, DataConfig, load_config,
                               save_config, validate)
from srft_mcore.config.schema import DemoQualityConfig
from srft_mcore.data import (EMBEDDED_TASK, DataError, build_dataset, generate_embedded,
                             tokenize_records)
from srft_mcore.data.demo_quality import (corrupt, count_for, score_demonstrations,
                                          set_demo_rewards, slip, truncate, write_record)
from srft_mcore.models.tiny import load_tokenizer
from srft_mcore.reward import extract_boxed, math_reward, strict_math_score
from srft_mcore.training.batching import build_sequences

# the embedded generator's demonstration, parsed independently of the module under test
CHAIN = re.compile(r"<think> ((?:\d+ [-+*] \d+ = \d+\. )+)</think> \\boxed\{(\d+)\}")
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
OPS = {"+": lambda a, d: a + d, "-": lambda a, d: a - d, "*": lambda a, d: a * d}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def steps_of(demo):
    m = CHAIN.fullmatch(demo)
    assert m is not None, f"not in the generator's format: {demo!r}"
    steps = [(int(a), s, int(d), int(b)) for a, s, d, b in STEP.findall(m.group(1))]
    return steps, int(m.group(2))


def records(n=200, seed=5, **task):
    return [dict(r, index=i) for i, r in
            enumerate(generate_embedded(n, seed=seed, **{**EMBEDDED_TASK, **task}))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def q(**kw):
    return DemoQualityConfig(**kw)


# ----------------------------------------------------------------------------- wrong: slip
def test_slip_by_hand():
    demo = "<think> 5 + 3 = 8. 8 * 2 = 16. </think> \\boxed{16}"
    # choose the slip "first step off by -1": 5 + 3 = 7, then 7 * 2 = 14
    pick = SimpleNamespace(choice=lambda opts: next(o for o in opts if o[:2] == (0, -1)))
    text, info = slip(demo, pick)
    assert text == "<think> 5 + 3 = 7. 7 * 2 = 14. </think> \\boxed{14}"
    assert info == {"kind": "slip", "step": 0, "offset": -1, "final": "14"}
    # a slip that would make a value < 1 is never offered: 4 - 3 = 1 cannot go to -1 or 0
    demo = "<think> 4 - 3 = 1. 1 + 2 = 3. </think> \\boxed{3}"
    offered = []
    slip(demo, SimpleNamespace(choice=lambda opts: offered.extend(opts) or opts[0]))
    assert {(k, off) for k, off, _ in offered} == {(0, 1), (0, 2), (1, -2), (1, -1), (1, 1),
                                                   (1, 2)}


@pytest.mark.parametrize("task", [dict(), dict(min_steps=4, max_steps=4)])
def test_wrong_embedded_demo_is_well_formed_consistent_and_wrong(task):
    recs = records(**task)
    out, rep = corrupt(recs, q(wrong_fraction=0.5, seed=3))
    assert rep.wrong_kind == "slip" and len(rep.wrong) == 100
    for w in rep.wrong:
        i = w["index"]
        gold, new = recs[i], out[i]
        (orig, _), (steps, boxed) = steps_of(gold["demonstration"]), steps_of(new["demonstration"])
        assert len(new["demonstration"].split()) == len(gold["demonstration"].split())
        # the same problem: same operations and operands, same start value
        assert [(s, d) for _, s, d, _ in steps] == [(s, d) for _, s, d, _ in orig]
        assert steps[0][0] == orig[0][0]
        wrong = [k for k, (a, s, d, b) in enumerate(steps) if OPS[s](a, d) != b]
        assert wrong == [w["step"]]  # exactly one slip, at the recorded step
        k = wrong[0]
        a, s, d, b = steps[k]
        assert b - OPS[s](a, d) == w["offset"] and w["offset"] in (-2, -1, 1, 2)
        assert steps[:k] == orig[:k]  # untouched before the slip
        for prev, (a, s, d, b) in zip(steps[k:], steps[k + 1:]):  # carried through after it
            assert a == prev[3] and b == OPS[s](a, d)
        assert all(b >= 1 for *_, b in steps)
        assert boxed == steps[-1][3] == int(w["final"]) != int(gold["answer"])
        assert math_reward(new["demonstration"], gold["answer"]) == 0.0
        assert strict_math_score(new["demonstration"], gold["answer"]).score == 0.0
        assert math_reward(gold["demonstration"], gold["answer"]) == 1.0
        assert new["prompt"] == gold["prompt"] and new["answer"] == gold["answer"]
    untouched = set(range(len(recs))) - {w["index"] for w in rep.wrong}
    assert all(out[i] == recs[i] for i in untouched)
    assert all("index" in r for r in recs) and recs == records(**task)  # input not changed


def test_slip_on_data_that_is_not_a_chain_is_an_error():
    recs = [{"index": 0, "prompt": "p", "demonstration": "x = 2. \\boxed{2}", "answer": "2"},
            {"index": 1, "prompt": "r", "demonstration": "y = 3. \\boxed{3}", "answer": "3"}]
    with pytest.raises(DataError, match="not an embedded-task chain.*wrong_kind=swap"):
        corrupt(recs, q(wrong_fraction=1.0, wrong_kind="slip"))
    assert corrupt(recs, q(wrong_fraction=1.0))[1].wrong_kind == "swap"  # auto


# ----------------------------------------------------------------------------- wrong: swap
def test_swap_gives_another_problems_demo_with_a_wrong_answer():
    # answers repeat (2 values), so the cyclic permutation must be repaired often
    recs = [{"index": i, "prompt": f"problem {i}", "answer": str(i % 2),
             "demonstration": f"reasoning {i}. \\boxed{{{i % 2}}}"} for i in range(30)]
    out, rep = corrupt(recs, q(wrong_fraction=0.5, wrong_kind="swap", seed=1))
    assert rep.wrong_kind == "swap" and len(rep.wrong) == 15
    texts = {r["demonstration"]: r["index"] for r in recs}
    for w in rep.wrong:
        i, new = w["index"], out[w["index"]]["demonstration"]
        assert texts[new] == w["from"] != i  # another record's own demonstration
        assert extract_boxed(new) != recs[i]["answer"]
        assert math_reward(new, recs[i]["answer"]) == 0.0
    recs_same = [dict(r, answer="7", demonstration="\\boxed{7}") for r in recs]
    with pytest.raises(DataError, match="no demonstration in the data has a final answer"):
        corrupt(recs_same, q(wrong_fraction=0.1, wrong_kind="swap"))


# ----------------------------------------------------------------------------- counts, seeds
@pytest.mark.parametrize("fraction, n, k", [(0.25, 10, 3), (0.5, 7, 4), (0.1, 20, 2),
                                            (0.24, 10, 2), (0.0, 10, 0), (1.0, 9, 9),
                                            (0.05, 9, 0)])
def test_count_rounds_half_up(fraction, n, k):
    assert count_for(fraction, n) == k


def test_fractions_are_exact_disjoint_and_capped():
    recs = records(n=10)
    out, rep = corrupt(recs, q(wrong_fraction=0.25, truncate_fraction=0.35))
    assert len(rep.wrong) == 3 and len(rep.truncated) == 4  # 2.5 -> 3, 3.5 -> 4
    assert not set(rep.wrong_indices) & set(rep.truncated_indices)
    changed = {i for i in range(10) if out[i]["demonstration"] != recs[i]["demonstration"]}
    assert changed == set(rep.wrong_indices) | set(rep.truncated_indices)
    # 0.5 + 0.5 of 3 records rounds to 2 + 2: the truncated ones are what is left
    _, rep = corrupt(records(n=3), q(wrong_fraction=0.5, truncate_fraction=0.5))
    assert len(rep.wrong) == 2 and len(rep.truncated) == 1


def test_seeded_and_nested_across_fractions():
    recs = records()
    a = corrupt(recs, q(wrong_fraction=0.3, truncate_fraction=0.2, seed=7))
    b = corrupt(recs, q(wrong_fraction=0.3, truncate_fraction=0.2, seed=7))
    assert a == b and a[1].digest == b[1].digest
    c = corrupt(recs, q(wrong_fraction=0.3, truncate_fraction=0.2, seed=8))
    assert c[1].wrong_indices != a[1].wrong_indices
    assert c[1].truncated_indices != a[1].truncated_indices and c[1].digest != a[1].digest
    # one seed, a larger fraction: a superset, each record slipped the same way
    big = corrupt(recs, q(wrong_fraction=0.6, seed=7))
    assert set(a[1].wrong_indices) < set(big[1].wrong_indices)
    assert all(big[0][i] == a[0][i] for i in a[1].wrong_indices)


def test_same_corruption_for_every_method_lr_and_train_seed(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", generate_embedded(60, seed=2, **EMBEDDED_TASK))
    common = [f"data.path={path}", "data.demo_quality.wrong_fraction=0.3",
              "data.demo_quality.truncate_fraction=0.2", "data.template=plain"]
    runs = [load_config(None, common + ["algorithm.name=srft", "optimizer.lr=1e-6",
                                        "train.seed=1", "data.shuffle_seed=11"]),
            load_config(None, common + ["algorithm.name=luffy", "optimizer.lr=5e-6",
                                        "train.seed=2", "data.shuffle_seed=99"])]
    built = [build_dataset(cfg.data, tok, report=lambda m: None) for cfg in runs]
    assert built[0].demo_quality.to_dict() == built[1].demo_quality.to_dict()
    assert len(built[0].demo_quality.wrong) == 18 and len(built[0].demo_quality.truncated) == 12
    assert [e.demonstration for e in built[0].examples] == \
        [e.demonstration for e in built[1].examples]
    assert [e.demo_ids for e in built[0].examples] == [e.demo_ids for e in built[1].examples]
    # pure RL reads no demonstrations: nothing to corrupt, no report
    assert build_dataset(runs[0].data, tok, require_demo=False).demo_quality is None


# ----------------------------------------------------------------------------- truncation
def test_truncation_cuts_strictly_inside_and_before_the_answer():
    recs = records(n=100)
    out, rep = corrupt(recs, q(truncate_fraction=1.0, seed=4))
    assert len(rep.truncated) == 100
    cuts = set()
    for t in rep.truncated:
        i, orig, new = t["index"], recs[t["index"]]["demonstration"], out[t["index"]]
        assert 0 < t["cut"] < t["length"] == len(orig)
        assert new["demonstration"] == orig[:t["cut"]]
        assert t["cut"] <= orig.index("\\boxed")  # no final answer after the cut
        assert "\\boxed" not in new["demonstration"]
        assert strict_math_score(new["demonstration"], recs[i]["answer"]).score == 0.0
        cuts.add(t["cut"])
    assert len(cuts) > 10  # drawn, not one fixed position
    # no box: the text after </think> is the answer; it is cut off too
    text = "<think> 2 + 2 </think> 4"
    for s in range(20):
        cut_text, cut = truncate(text, random.Random(s))
        assert 1 <= cut <= text.index("4") and cut_text == text[:cut]
    # the answer opens the text: cut anywhere strictly inside
    for s in range(20):
        cut_text, cut = truncate("\\boxed{12}", random.Random(s))
        assert 1 <= cut <= 9


# ----------------------------------------------------------------------------- source
def test_source_replaces_by_prompt(tmp_path):
    recs = records(n=6)
    weak = [{"prompt": "  " + r["prompt"] + "\n", "demonstration": f"weak {i} \\boxed{{0}}"}
            for i, r in enumerate(recs)][::-1]
    weak.append({"prompt": recs[0]["prompt"], "demonstration": "a second answer"})  # dup
    weak.append({"prompt": "a prompt the data does not have", "demonstration": "x"})
    path = write_jsonl(tmp_path / "weak.jsonl", weak)
    out, rep = corrupt(recs, q(source=path))
    assert [r["demonstration"] for r in out] == [f"weak {i} \\boxed{{0}}" for i in range(6)]
    assert rep.replaced == 6 and rep.unmatched == [] and rep.source_duplicates == 1
    assert [r["answer"] for r in out] == [r["answer"] for r in recs]
    # corruption applies to the source's demonstrations (not chains: auto swaps them)
    out, rep = corrupt(recs, q(source=path, wrong_fraction=0.5))
    assert rep.wrong_kind == "swap"
    assert all(out[i]["demonstration"].startswith("weak") for i in rep.wrong_indices)


def test_source_errors(tmp_path):
    recs = records(n=6)
    part = write_jsonl(tmp_path / "part.jsonl",
                       [{"prompt": r["prompt"], "demonstration": "w"} for r in recs[:4]])
    with pytest.raises(DataError, match=r"no demonstration for 2 of 6 training prompts "
                                        r"\(record index 4, 5;.*source_missing=keep"):
        corrupt(recs, q(source=part))
    out, rep = corrupt(recs, q(source=part, source_missing="keep"))
    assert rep.unmatched == [4, 5] and rep.replaced == 4
    assert [r["demonstration"] for r in out] == ["w"] * 4 + [r["demonstration"]
                                                             for r in recs[4:]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "p", "demonstration": "d"}])
    with pytest.raises(DataError, match=r"data\.demo_quality\.source=.*no field 'prompt'"):
        corrupt(recs, q(source=bad))
    with pytest.raises(DataError, match=r"data\.demo_quality\.source=.*does not exist"):
        corrupt(recs, q(source=str(tmp_path / "missing.jsonl")))
    # a missing file is refused by validate(), before any data or model is loaded
    cfg = load_config(None, [f"data.demo_quality.source={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data\.demo_quality\.source=.*does not exist"):
        validate(cfg)


# ----------------------------------------------------------------------------- config
def test_nested_config_section(tmp_path):
    cfg = load_config(None, ["data.demo_quality.wrong_fraction=0.5", "data.verify_demos=true",
                             "data.demo_quality.seed=9"])
    assert cfg.data.demo_quality == DemoQualityConfig(wrong_fraction=0.5, seed=9)
    assert cfg.data.verify_demos is True
    assert DataConfig().verify_demos is False and DataConfig().demo_quality == q()
    path = tmp_path / "c.yaml"
    save_config(cfg, str(path))
    assert load_config(str(path)).data == cfg.data
    path.write_text("data:\n  demo_quality:\n    truncate_fraction: 0.25\n")
    assert load_config(str(path)).data.demo_quality.truncate_fraction == 0.25
    with pytest.raises(ConfigError, match=r"data\.demo_quality\.wrongfraction=.*unknown key"):
        load_config(None, ["data.demo_quality.wrongfraction=0.5"])
    with pytest.raises(ConfigError, match=r"data\.demo_quality\.wrong_fraction='x': expected"):
        load_config(None, ["data.demo_quality.wrong_fraction=x"])


@pytest.mark.parametrize("override, match", [
    ("data.demo_quality.wrong_fraction=1.5", r"wrong_fraction=1\.5: must be in \[0, 1\]"),
    ("data.demo_quality.truncate_fraction=-0.1", r"truncate_fraction=-0\.1: must be in"),
    ("data.demo_quality.wrong_kind=typo", r"wrong_kind='typo': not a supported.*slip, swap"),
    ("data.demo_quality.source_missing=drop", r"source_missing='drop': not a supported"),
])
def test_validate_refuses_bad_values(override, match):
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, [override]))


def test_validate_fraction_sum():
    with pytest.raises(ConfigError, match=r"truncate_fraction=0\.5: .*exceed 1"):
        validate(load_config(None, ["data.demo_quality.wrong_fraction=0.6",
                                    "data.demo_quality.truncate_fraction=0.5"]))
    validate(load_config(None, ["data.demo_quality.wrong_fraction=0.7",
                                "data.demo_quality.truncate_fraction=0.3"]))


# ----------------------------------------------------------------------------- verify_demos
def eq7(rewards):
    """Eq. 7 by hand on Python floats: (r - mean) / unbiased std."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / std for r in rewards]


def test_verified_wrong_demo_gets_reward_zero_in_its_group(tok):
    recs = records(n=2, seed=11)
    out, rep = corrupt(recs, q(wrong_fraction=0.5, seed=0))
    bad = rep.wrong_indices[0]
    ds = tokenize_records(out, tok, template="plain")
    scores, timeouts = score_demonstrations(ds.examples, math_reward)
    assert timeouts == 0 and scores[bad] == 0.0 and scores[1 - bad] == 1.0
    rolls = [[SimpleNamespace(token_ids=[5, 6], logprobs=None)] * 3 for _ in range(2)]
    rewards = [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    algo = AlgorithmConfig(name="srft", adv_std_norm=True)

    # data.verify_demos=false (default): every demonstration is trusted as reward 1
    trusted = build_sequences(ds.examples, rolls, rewards, algo)
    demos = [s for s in trusted if s.is_demo]
    assert [s.reward for s in demos] == [1.0, 1.0]
    # group [1, 0, 0, 1]: mean 0.5, std sqrt(1/3): advantages +-0.866
    assert [s.advantage for s in trusted if s.group == bad] == \
        pytest.approx([0.8660, -0.8660, -0.8660, 0.8660], abs=1e-3)

    verified = set_demo_rewards(ds.examples, scores)
    assert verified == {"scored": 2, "reward_1": 1, "below_1": [bad]}
    seqs = build_sequences(ds.examples, rolls, rewards, algo)
    assert [s.reward for s in seqs if s.is_demo and s.group == bad] == [0.0]
    # group [1, 0, 0, 0]: mean 0.25, std 0.5: the right rollout 1.5, the rest -0.5
    assert [s.advantage for s in seqs if s.group == bad] == \
        pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-4)
    assert [s.advantage for s in seqs if s.group == bad] == \
        pytest.approx(eq7([1, 0, 0, 0]), abs=1e-4)
    # the verified right demonstration keeps reward 1 and the trusted advantages
    assert [s.advantage for s in seqs if s.group != bad] == \
        pytest.approx([s.advantage for s in trusted if s.group != bad])


def test_record_lists_the_corrupted_indices(tmp_path):
    recs = records(n=20)
    _, rep = corrupt(recs, q(wrong_fraction=0.2, truncate_fraction=0.1))
    path = write_record(str(tmp_path / "demo_quality.json"), rep,
                        {"scored": 20, "reward_1": 16, "below_1": [1, 2, 3, 4]})
    saved = json.loads(open(path).read())
    assert [w["index"] for w in saved["wrong"]] == rep.wrong_indices and len(rep.wrong) == 4
    assert [t["index"] for t in saved["truncated"]] == rep.truncated_indices
    assert saved["digest"] == rep.digest and saved["seed"] == 0
    assert saved["verify_demos"]["below_1"] == [1, 2, 3, 4]
    assert write_record(str(tmp_path / "none.json"), None) is None
    assert not (tmp_path / "none.json").exists()
