import json
import re

import pytest

from srft_mcore.config import DataConfig
from srft_mcore.data import (DataError, PromptSampler, TemplateError, build_dataset,
                             generate_embedded, load_records, render_prompt, tokenize_records,
                             write_embedded_dataset)
from srft_mcore.data.templates import THINK_SYSTEM_PROMPT
from srft_mcore.models.tiny import load_tokenizer
from srft_mcore.reward import math_reward


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


ROWS = [{"q": f"What is {i} + 1?", "sol": f"{i} + 1 = {i + 1}. \\boxed{{{i + 1}}}", "ans": i + 1}
        for i in range(6)]


# ----------------------------------------------------------------------------- embedded task
def _solve(prompt):
    """Independent evaluation of an embedded prompt by reading its words; returns the
    running values."""
    m = re.match(r"Start with (\d+), (.*)\.$", prompt)
    values = [int(m.group(1))]
    for part in m.group(2).split(", "):
        part = part.removeprefix("then ")
        op, d = part.rsplit(" ", 1)
        v = values[-1]
        values.append({"add": v + int(d), "subtract": v - int(d), "multiply by": v * int(d)}[op])
    return values


def test_embedded_is_deterministic_and_correct(tok):
    a, b = generate_embedded(200, seed=7), generate_embedded(200, seed=7)
    assert a == b
    assert a != generate_embedded(200, seed=8)
    for rec in a:
        values = _solve(rec["prompt"])
        assert int(rec["answer"]) == values[-1]
        assert 1 <= min(values) and max(values) <= 20
        assert rec["demonstration"].startswith("<think>")
        assert math_reward(rec["demonstration"], rec["answer"], rec["prompt"]) == 1.0
        n_steps = rec["demonstration"].count("=")
        assert 2 <= n_steps <= 3
    lengths = [len(tok.encode(r["demonstration"], add_special_tokens=False)) + 1 for r in a]
    assert 15 <= min(lengths) and max(lengths) <= 40
    wide = generate_embedded(300, seed=7, max_value=40)
    assert max(max(_solve(r["prompt"])) for r in wide) > 20
    assert all(max(_solve(r["prompt"])) <= 40 for r in wide)


def test_embedded_numbers_are_single_tokens(tok):
    # every number of the task (running values < 50) is one token, with or without a space
    for n in range(50):
        assert len(tok.encode(f" {n}", add_special_tokens=False)) == 1, n
        assert len(tok.encode(f"{{{n}}}", add_special_tokens=False)) == 3, n


def test_write_embedded_roundtrip(tmp_path):
    path = write_embedded_dataset(str(tmp_path / "sub" / "task.jsonl"), n=20, seed=3)
    recs = load_records(path)
    assert [(r["prompt"], r["demonstration"], r["answer"]) for r in recs] == \
        [(r["prompt"], r["demonstration"], r["answer"]) for r in generate_embedded(20, 3)]
    assert [r["index"] for r in recs] == list(range(20))


def test_shipped_held_out_splits_are_never_trained_on(tmp_path):
    from srft_mcore.data import (EMBEDDED_TASK, embedded_eval_splits, embedded_validation_split,
                                 held_out_prompts)
    from srft_mcore.data.embedded import make_eval_splits, pretraining_problems

    shipped = {**embedded_eval_splits(), **embedded_validation_split()}
    splits = {name: load_records(path) for name, path in shipped.items()}
    assert sorted(splits) == ["id", "ood", "val"]
    for name, recs in splits.items():
        assert len(recs) == len({r["prompt"] for r in recs}) == 200  # distinct problems
        for rec in recs:
            values = _solve(rec["prompt"])
            assert int(rec["answer"]) == values[-1] and max(values) <= 10
            # ood: four-step chains, longer than pre-training's (up to three) and training's
            assert rec["demonstration"].count("=") == (4 if name == "ood" else 2)
    prompts = {name: {r["prompt"] for r in recs} for name, recs in splits.items()}
    assert not prompts["val"] & prompts["id"]
    # neither two-step split holds a pre-training problem (the base model never read them)
    pretrained = {r["prompt"] for r in pretraining_problems(2, prompts["id"] | prompts["ood"])}
    assert len(pretrained) > 200 and not pretrained & (prompts["id"] | prompts["val"])
    # the files are what the generator writes (tools/make_embedded_model.py regenerates them)
    again = make_eval_splits(str(tmp_path))
    for name, path in again.items():
        assert open(path).read() == open(shipped[name]).read()
    held_out = held_out_prompts()
    assert len(held_out) == 600
    # the demo's training data (any seed) skips them, and still covers most other problems
    for seed in (0, 1, 1234):
        train = generate_embedded(2000, seed=seed, exclude=held_out, **EMBEDDED_TASK)
        prompts = {r["prompt"] for r in train}
        assert not prompts & held_out and len(prompts) > 400
    # without the exclusion the same draw would contain most of the id split
    plain = {r["prompt"] for r in generate_embedded(2000, seed=0, **EMBEDDED_TASK)}
    assert len(plain & {r["prompt"] for r in splits["id"]}) > 100
    # and the embedded dataset the trainer reads goes through the same exclusion
    ds_path = str(tmp_path / "embedded_task.jsonl")
    write_embedded_dataset(ds_path, n=2000, seed=0, exclude=held_out, **EMBEDDED_TASK)
    assert not {r["prompt"] for r in load_records(ds_path)} & held_out
    with pytest.raises(ValueError, match="fewer than 900 problems"):
        generate_embedded(900, seed=0, distinct=True, **EMBEDDED_TASK)


# ----------------------------------------------------------------------------- loading
def test_load_formats_and_field_names(tmp_path):
    import datasets

    expected = [(r["q"], r["sol"], str(r["ans"])) for r in ROWS]
    ds = datasets.Dataset.from_list(ROWS)
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for path in (jsonl, tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved",
                 tmp_path / "saved_dict", arrow):
        recs = load_records(str(path), "q", "sol", "ans")
        assert [(r["prompt"], r["demonstration"], r["answer"]) for r in recs] == expected, path


def test_missing_field_reported_by_index(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[3]["ans"]
    rows[5]["ans"] = None
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"2 record\(s\) have no 'ans'.*record index 3, 5"):
        load_records(path, "q", "sol", "ans")
    with pytest.raises(DataError,
                       match=r"no field 'solution'.*data.demo_key.*\['q', 'sol', 'ans'\]"):
        load_records(path, "q", "solution", "ans")
    # pure RL: demonstrations are not read at all
    recs = load_records(_write_jsonl(tmp_path / "e.jsonl", ROWS), "q", None, "ans")
    assert all(r["demonstration"] is None for r in recs)


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*\.jsonl, \.json, \.parquet, \.arrow"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown format '\.csv'"):
        load_records(str(tmp_path / "d.csv"))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", \n')
    with pytest.raises(DataError, match=r"broken\.jsonl.*could not be read as json"):
        load_records(str(tmp_path / "broken.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        load_records(str(tmp_path / "emptydir"))


# ----------------------------------------------------------------------------- templates
def test_templates(tok):
    t = render_prompt(tok, "Start with 1, add 2.", "tokenizer")
    assert t == "<|im_start|>user\nStart with 1, add 2.<|im_end|>\n<|im_start|>assistant\n"
    t = render_prompt(tok, "Start with 1, add 2.", "think")
    assert t.startswith(f"<|im_start|>system\n{THINK_SYSTEM_PROMPT}<|im_end|>\n")
    assert t.endswith("<|im_start|>assistant\n")
    assert "<think>" in THINK_SYSTEM_PROMPT and "\\boxed{}" in THINK_SYSTEM_PROMPT
    assert render_prompt(tok, "P", "plain") == "Question: P\nAnswer:"
    with pytest.raises(TemplateError, match="not a template"):
        render_prompt(tok, "P", "fancy")


def test_tokenizer_without_chat_template(tok):
    import copy

    base = copy.deepcopy(tok)
    base.chat_template = None
    with pytest.raises(TemplateError, match="data.template=think.*data.template=plain"):
        render_prompt(base, "P", "tokenizer")
    assert render_prompt(base, "P", "think") == \
        f"System: {THINK_SYSTEM_PROMPT}\nUser: P\nAssistant:"


# ----------------------------------------------------------------------------- tokenising
def test_tokenize_and_filter(tok):
    recs = [{"index": i, "prompt": p, "demonstration": d, "answer": a} for i, (p, d, a) in
            enumerate([("Start with 1, add 2.", "<think> 1 + 2 = 3. </think> \\boxed{3}", "3"),
                       ("Start with 1, add 2. " * 20, "\\boxed{3}", "3"),
                       ("Start with 2, add 2.", "<think> 2 + 2 = 4. </think> " * 10, "4"),
                       ("Start with 3, add 2.", "<think> 3 + 2 = 5. </think> \\boxed{5}", "5")])]
    ds = tokenize_records(recs, tok, "tokenizer", max_prompt_len=40, max_response_len=30)
    assert [e.index for e in ds.examples] == [0, 3]
    assert (ds.stats.total, ds.stats.kept, ds.stats.prompt_too_long, ds.stats.demo_too_long,
            ds.stats.filtered) == (4, 2, 1, 1, 2)
    e = ds[0]
    assert e.demo_ids[-1] == tok.eos_token_id
    assert tok.decode(e.demo_ids[:-1]) == recs[0]["demonstration"]
    assert tok.decode(e.prompt_ids) == e.prompt_text == render_prompt(tok, recs[0]["prompt"])
    assert e.prompt == recs[0]["prompt"] and e.answer == "3"
    assert len(e.prompt_ids) <= 40 and len(e.demo_ids) <= 30
    assert ds.batch([1, 0]) == [ds[1], ds[0]]
    assert "filtered 2 (prompt > 40 tokens: 1, demonstration > 30 tokens: 1)" in \
        ds.stats.summary(40, 30)


def test_build_dataset_embedded_and_user(tok, tmp_path):
    msgs = []
    ds = build_dataset(DataConfig(template="think"), tok, run_dir=str(tmp_path),
                       embedded={"n": 64}, report=msgs.append)
    assert len(ds) == 64 and msgs and "kept 64" in msgs[0]
    assert (tmp_path / "embedded_task.jsonl").exists()
    assert all(e.demo_ids[-1] == tok.eos_token_id for e in ds.examples)
    path = _write_jsonl(tmp_path / "u.jsonl", ROWS)
    cfg = DataConfig(path=path, prompt_key="q", demo_key="sol", answer_key="ans",
                     template="plain", max_prompt_len=8)
    with pytest.raises(DataError, match="nothing left to train on"):
        build_dataset(cfg, tok, report=msgs.append)
    cfg.max_prompt_len = 64
    rl = build_dataset(cfg, tok, require_demo=False, report=msgs.append)
    assert len(rl) == len(ROWS) and rl[0].demo_ids is None


# ----------------------------------------------------------------------------- sampler
def _take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_epochs_and_determinism():
    s = PromptSampler(10, 3, seed=5)
    batches = _take(s, 6)  # 3 per epoch (remainder of 1 skipped), 2 epochs
    assert all(len(b) == 3 for b in batches)
    for epoch in (batches[:3], batches[3:]):
        flat = [i for b in epoch for i in b]
        assert len(set(flat)) == 9 and all(0 <= i < 10 for i in flat)
    assert batches[:3] != batches[3:]  # reshuffled with seed + epoch
    assert s.epoch == 1
    assert _take(PromptSampler(10, 3, seed=5), 6) == batches
    assert _take(PromptSampler(10, 3, seed=6), 6) != batches


def test_sampler_resume_gives_same_batches():
    ref = PromptSampler(17, 4, seed=1)
    ref_batches = _take(ref, 12)
    for cut in (0, 3, 4, 5, 11):
        first = PromptSampler(17, 4, seed=1)
        head = _take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = PromptSampler(17, 4, seed=1)
        resumed.load_state_dict(state)
        assert head + _take(resumed, 12 - cut) == ref_batches, cut


def test_sampler_errors():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        PromptSampler(3, 4)
    state = PromptSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved for 10 records"):
        PromptSampler(11, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed 1"):
        PromptSampler(10, 2, seed=2).load_state_dict(state)
