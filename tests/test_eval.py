"""srft-eval and evaluate_splits: scoring of known answers, multiple choice with seeded option
shuffles, avg@k arithmetic, field detection and its errors (no server), and real SGLang
evaluations of the embedded model (HF directory, attached URL, trainer checkpoint)."""
import json
import os
import subprocess
import sys
import time

import pytest

from srft_mcore.evaluation.errors import EvalError
from srft_mcore.evaluation.models import resolve_model
from srft_mcore.evaluation.records import (LETTERS, answer_text, detect_layout, load_eval_set,
                                           shuffle_options)
from srft_mcore.evaluation.runner import evaluate_splits, paper_sampling, run_eval
from srft_mcore.evaluation.scoring import (extract_choice, math_score, metric_name,
                                           sample_accuracy, score_item)
from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- math scoring
@pytest.mark.parametrize("response, answer, expected", [
    ("<think> halve it </think> \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("<think> x </think> The answer is 0.5", "\\frac{1}{2}", 1.0),  # unboxed after </think>
    ("<think> x </think> so we get $\\frac{1}{2}$.", "0.5", 1.0),
    ("The answer is 0.5", "\\frac{1}{2}", 1.0),          # no think block: the whole text
    ("<think> The answer is 0.5", "\\frac{1}{2}", 0.0),  # reasoning never closed: no answer
    ("\\boxed{2}", "\\boxed{2}", 1.0),                    # boxed gold
    ("<think> 5 + 3 = 8. 8 * 2 = 16. </think> 16", "16", 1.0),
    ("\\boxed{3}", "2", 0.0),                             # wrong, boxed
    ("The answer is 0.6", "\\frac{1}{2}", 0.0),           # wrong, unboxed
    ("<think> maybe 16 </think> it is 15", "16", 0.0),    # only the text after </think>
    ("\\boxed{16} <think> no", "16", 1.0),
    ("", "16", 0.0),
    ("no number at all", "16", 0.0),
])
def test_math_score_known_answers(response, answer, expected):
    assert math_score(response, answer)[0] == expected


def test_math_score_reports_what_it_extracted():
    assert math_score("\\boxed{\\frac{1}{2}}", "0.5") == (1.0, "\\frac{1}{2}")
    assert math_score("<think> x </think> The answer is 0.6", "0.5") == (0.0, "0.6")


@pytest.mark.parametrize("value, text", [
    (142.0, "142"), (2.5, "2.5"), (7, "7"), (["$\\frac{1}{2}$"], "\\frac{1}{2}"),
    ([1, 2], "1, 2"), ("  $x+1$ ", "x+1"), ("\\$5", "\\$5"),
])
def test_reference_answers_as_text(value, text):
    assert answer_text(value) == text


def test_a_training_reward_can_score_math_answers():
    from srft_mcore.evaluation.records import EvalItem
    from srft_mcore.reward import math_reward

    item = EvalItem(index=0, id=None, question="q", prompt="q", answer="0.5")
    # the training reward wants a box; the evaluation's default scorer does not
    assert score_item(item, "<think> x </think> The answer is 0.5") == (1.0, "0.5")
    assert score_item(item, "<think> x </think> The answer is 0.5",
                      reward_fn=math_reward) == (0.0, None)
    assert score_item(item, "\\boxed{1/2}", reward_fn=math_reward) == (1.0, "1/2")


# --------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("response, letter", [
    ("\\boxed{C}", "C"),
    ("\\boxed{\\text{(B)}}", "B"),
    ("\\boxed{D. 42}", "D"),
    ("Answer: D", "D"),
    ("so the answer is (A).", "A"),
    ("Final Answer: **C**", "C"),
    ("<think> A looks wrong </think> I pick B", "B"),
    ("<think> surely A </think> \\boxed{C}", "C"),
    ("The answer is B, not A", "B"),
    ("A. no, B. no, so it must be D", "D"),
    ("I am unsure", None),          # "I" is not one of four options' letters
    ("\\boxed{42}", None),
])
def test_extract_choice(response, letter):
    assert extract_choice(response, 4) == letter


def _mc_rows():
    """The same four questions in the layouts of MMLU-Pro, ARC-C, GPQA and MMLU."""
    qs = [("Capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
          ("2 + 2?", ["3", "5", "4", "22"], 2),
          ("Largest planet?", ["Jupiter", "Mars", "Venus", "Earth"], 0),
          ("Water boils at (C)?", ["50", "90", "120", "100"], 3)]
    mmlu_pro = [{"question": q, "options": o, "answer": LETTERS[g], "answer_index": g,
                 "question_id": 100 + i} for i, (q, o, g) in enumerate(qs)]
    arc = [{"id": f"arc{i}", "question": q,
            "choices": {"text": o, "label": ["1", "2", "3", "4"] if i == 0 else list("ABCD")},
            "answerKey": str(g + 1) if i == 0 else LETTERS[g]} for i, (q, o, g) in enumerate(qs)]
    gpqa = [{"Question": q, "Correct Answer": o[g],
             **{f"Incorrect Answer {k + 1}": w for k, w in enumerate(x for x in o if x != o[g])}}
            for q, o, g in qs]
    mmlu = [{"question": q, "choices": o, "answer": g} for q, o, g in qs]
    text_answer = [{"question": q, "options": o, "answer": o[g]} for q, o, g in qs]
    truth = [o[g] for _, o, g in qs]
    return {"mmlu_pro": mmlu_pro, "arc": arc, "gpqa": gpqa, "mmlu": mmlu,
            "text": text_answer}, truth


@pytest.mark.parametrize("layout", ["mmlu_pro", "arc", "gpqa", "mmlu", "text"])
def test_shuffled_options_map_back_to_the_right_option(tmp_path, layout):
    layouts, truth = _mc_rows()
    path = write_jsonl(tmp_path / f"{layout}.jsonl", layouts[layout])
    evalset = load_eval_set(path, seed=3)
    assert evalset.kind == "choice" and len(evalset.items) == 4
    moved = 0
    for item, right in zip(evalset.items, truth):
        gold = LETTERS.index(item.answer)
        assert item.choices[gold] == right
        assert sorted(item.choices) == sorted(layouts["mmlu"][item.index]["choices"])
        assert f"\n{item.answer}. {right}\n" in item.prompt
        assert score_item(item, f"<think> ... </think> \\boxed{{{item.answer}}}") == \
            (1.0, item.answer)
        for wrong in (c for c in LETTERS[:4] if c != item.answer):
            assert score_item(item, f"Answer: {wrong}")[0] == 0.0
        moved += item.choices != layouts["mmlu"][item.index]["choices"]
    assert moved >= 2  # the options really are shuffled
    unshuffled = load_eval_set(path, shuffle=False)
    if layout == "gpqa":  # the file order puts the correct answer first: shuffling matters
        assert [it.answer for it in unshuffled.items] == ["A"] * 4
    else:
        assert [it.choices for it in unshuffled.items] == [r["choices"] for r in layouts["mmlu"]]


def test_option_shuffle_is_seeded_and_stable_across_processes():
    options = [f"option {k}" for k in range(10)]
    first = [shuffle_options(options, 7, seed=11, index=i) for i in range(20)]
    assert first == [shuffle_options(options, 7, seed=11, index=i) for i in range(20)]
    other = [shuffle_options(options, 7, seed=12, index=i) for i in range(20)]
    assert first != other
    for shuffled, gold in first:
        assert shuffled[gold] == "option 7"
    # another interpreter with another hash seed draws the same orders
    code = ("import json; from srft_mcore.evaluation.records import shuffle_options as s; "
            "print(json.dumps([s([f'option {k}' for k in range(10)], 7, seed=11, index=i) "
            "for i in range(20)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONHASHSEED="12345"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert [tuple(x) for x in json.loads(out.stdout)] == [(a, b) for a, b in first]


def test_multiple_choice_answer_that_names_no_option_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "q0", "options": ["a", "b"], "answer": "A"},
        {"question": "q1", "options": ["a", "b"], "answer": "E"}])
    with pytest.raises(EvalError, match=r"record 1: answer 'E'.*2 options.*Fix:"):
        load_eval_set(path)


# --------------------------------------------------------------------------- avg@k
def test_avg_at_k_by_hand():
    correct = [[1, 1, 1, 1],   # per problem: 4/4
               [1, 0, 0, 0],   # 1/4
               [0, 0, 0, 0],   # 0/4
               [1, 1, 0, 0]]   # 2/4
    # per sample j: 3/4, 2/4, 1/4, 1/4 -> mean 0.4375 (= mean of 1, .25, 0, .5)
    acc, std = sample_accuracy(correct)
    assert acc == pytest.approx(0.4375)
    assert std == pytest.approx((((0.75 - 0.4375) ** 2 + (0.5 - 0.4375) ** 2
                                  + 2 * (0.25 - 0.4375) ** 2) / 4) ** 0.5)
    assert sample_accuracy([[1], [0], [1]]) == (pytest.approx(2 / 3), 0.0)
    assert (metric_name(1), metric_name(32)) == ("pass@1", "avg@32")
    with pytest.raises(ValueError, match="same number of samples"):
        sample_accuracy([[1, 0], [1]])


class _OrderedClient:
    """Fault-injection stand-in for SGLangClient: sample j of a problem gets its j-th
    scripted response; records the sampling parameters of every request."""

    urls = ["http://scripted"]
    max_concurrency = 1  # one request at a time: samples arrive in order

    def __init__(self, script):
        from srft_mcore.models.tiny import load_tokenizer

        self.script = script
        self.tok = load_tokenizer(EMBEDDED_MODEL_DIR)
        self.requests = []
        self.seen = {}

    def generate(self, prompts, n=1, sampling=None, return_logprob=True):
        from srft_mcore.rollout.client import Completion

        self.requests.append(sampling)
        key = next(k for k in self.script if k in self.tok.decode(prompts[0]))
        j = self.seen.get(key, 0)
        self.seen[key] = j + 1
        return [[Completion(token_ids=[5] * 3, text=self.script[key][j], logprobs=None,
                            finish_reason="stop")]]


def test_run_eval_counts_avg_at_k_over_samples(tmp_path):
    from srft_mcore.models.tiny import load_tokenizer

    rows = [{"problem": f"Start with {i}, add 1.", "answer": str(i + 1), "unique_id": f"u{i}"}
            for i in range(1, 4)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    per_problem = {  # 2 samples each: right/right, right/wrong, wrong/wrong
        "Start with 1,": ["\\boxed{2}", "\\boxed{2}"],
        "Start with 2,": ["\\boxed{3}", "\\boxed{4}"],
        "Start with 3,": ["\\boxed{9}", "5"]}
    client = _OrderedClient(per_problem)
    res = run_eval(client, load_eval_set(path), load_tokenizer(EMBEDDED_MODEL_DIR), "tokenizer",
                   paper_sampling(seed=5, max_new_tokens=16), n_samples=2, context_length=64)
    assert (res.metric, res.n, res.samples) == ("avg@2", 3, 2)
    assert res.acc == pytest.approx((2 / 3 + 1 / 3) / 2)  # sample 0: 2 of 3, sample 1: 1 of 3
    assert [(r["id"], r["sample"], r["correct"]) for r in res.rows] == [
        ("u1", 0, True), ("u1", 1, True), ("u2", 0, True), ("u2", 1, False),
        ("u3", 0, False), ("u3", 1, False)]
    # the paper's decoding, a stop at eos, one seed per (problem, sample), a fitting budget
    assert {s.temperature for s in client.requests} == {0.6}
    assert len({s.seed for s in client.requests}) == 6
    assert all(s.stop_token_ids == [2] and 1 <= s.max_new_tokens <= 16 for s in client.requests)


def test_budget_is_capped_by_the_served_context(tmp_path):
    from srft_mcore.evaluation.runner import prompt_ids
    from srft_mcore.models.tiny import load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "Start with 1, add 1.", "answer": "2"},
        {"problem": "Start with 2, " + "add 1, " * 40 + "then add 1.", "answer": "44"}])
    evalset = load_eval_set(path)
    short, long_ = (len(ids) for ids in prompt_ids(evalset.items, tok, "tokenizer"))
    context = short + 10
    assert long_ > context
    client = _OrderedClient({"Start with 1,": ["\\boxed{2}"], "Start with 2,": ["never"]})
    res = run_eval(client, evalset, tok, "tokenizer", paper_sampling(), context_length=context)
    assert [s.max_new_tokens for s in client.requests] == [10 - 2]  # context - prompt - margin
    assert [r["finish_reason"] for r in res.rows] == ["stop", "prompt_too_long"]
    assert res.acc == 0.5 and res.metric == "pass@1"


# --------------------------------------------------------------------------- fields
@pytest.mark.parametrize("rows, prompt, answer, first_answer", [
    ([{"problem": "p", "solution": "s \\boxed{1}", "answer": "1", "subject": "x", "level": 1,
       "unique_id": "test/x/1.json"}], "problem", "answer", "1"),              # MATH-500
    ([{"ID": "2024-I-1", "Problem": "p", "Solution": "s", "Answer": 204}],
     "Problem", "Answer", "204"),                                               # AIME24
    ([{"id": 0, "problem": "p", "answer": 142.0, "url": "u"}], "problem", "answer", "142"),
    ([{"question": "p", "answer": "2.5\\times10^{3}"}], "question", "answer",
     "2.5\\times10^{3}"),                                                       # Minerva
    ([{"id": 1, "question": "p", "final_answer": ["$\\frac{1}{2}$"], "solution": ["s"]}],
     "question", "final_answer", "\\frac{1}{2}"),                               # OlympiadBench
])
def test_math_layouts_are_detected(tmp_path, rows, prompt, answer, first_answer):
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    evalset = load_eval_set(path)
    assert evalset.kind == "math" and evalset.name == "set"
    assert (evalset.fields["prompt"], evalset.fields["answer"]) == (prompt, answer)
    assert evalset.items[0].answer == first_answer and evalset.items[0].prompt == "p"


def test_parquet_and_named_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "aime.parquet")
    pq.write_table(pa.table({"q_text": ["p1", "p2"], "gold": ["3", "4"], "x": [1, 2]}), path)
    evalset = load_eval_set(path, prompt_key="q_text", answer_key="gold")
    assert [(it.prompt, it.answer) for it in evalset.items] == [("p1", "3"), ("p2", "4")]
    with pytest.raises(EvalError, match=r"no field 'nope' \(--answer-key\).*'q_text'.*Fix:"):
        load_eval_set(path, answer_key="nope")


def test_unknown_fields_error_lists_found_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "p", "label_x": "1"}])
    with pytest.raises(EvalError) as e:
        load_eval_set(path)
    msg = str(e.value)
    assert "['text', 'label_x']" in msg                       # found
    assert "problem, question" in msg and "answer, final_answer" in msg  # expected
    assert "options, choices" in msg and msg.rstrip().endswith(
        "(and --options-key for multiple choice)")
    assert "Fix: name the fields with --prompt-key and --answer-key" in msg
    assert detect_layout(["Problem", "Final Answer"], "f").answer == "Final Answer"


def test_cli_bad_file_fails_before_any_server(tmp_path):
    bad = write_jsonl(tmp_path / "odd.jsonl", [{"text": "p", "label_x": "1"}])
    out_dir = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "srft_mcore.evaluation", "--model", EMBEDDED_MODEL_DIR,
                          "--data", bad, "--out", str(out_dir)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "['text', 'label_x']" in res.stderr and "Fix:" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"] is False
    assert not out_dir.exists()  # nothing written, no server log: no server was started


# --------------------------------------------------------------------------- model sources
def test_model_sources_are_told_apart(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000002"
    (step / "mcore").mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_000002")
    with pytest.raises(EvalError, match="no run config.yaml.*Fix: pass --hf-config"):
        resolve_model(str(step))
    (run / "config.yaml").write_text("model:\n  hf_path: null\ndata:\n  template: plain\n")
    for given in (step, run, run / "checkpoints"):  # step, run dir, checkpoints root
        src = resolve_model(str(given))
        assert (src.kind, src.path) == ("trainer", str(step))
        assert src.hf_dir == EMBEDDED_MODEL_DIR and src.run_config["data"]["template"] == "plain"
    assert resolve_model(str(step), hf_config=str(tmp_path)).hf_dir == str(tmp_path)
    src = resolve_model(EMBEDDED_MODEL_DIR)
    assert (src.kind, src.hf_dir, src.run_config) == ("hf", EMBEDDED_MODEL_DIR, None)
    with pytest.raises(EvalError, match="not a HF model directory.*Fix:"):
        resolve_model(str(tmp_path))


# --------------------------------------------------------------------------- SGLang (slow)
N_PROBLEMS = 12


@pytest.fixture(scope="module")
def embedded_files(tmp_path_factory):
    """A MATH-500-style file of embedded-task problems and a small multiple-choice file."""
    from srft_mcore.data import EMBEDDED_TASK, generate_embedded

    work = tmp_path_factory.mktemp("eval_data")
    recs = generate_embedded(N_PROBLEMS, seed=4242, **EMBEDDED_TASK)
    math_path = write_jsonl(work / "embedded.jsonl", [
        {"problem": r["prompt"], "answer": r["answer"], "unique_id": f"embedded/{i}"}
        for i, r in enumerate(recs)])
    mc_path = write_jsonl(work / "mc.jsonl", [
        {"question": r["prompt"], "options": [r["answer"], str(int(r["answer"]) + 1),
                                              str(int(r["answer"]) + 2)], "answer": 0}
        for r in recs[:4]])
    return math_path, mc_path


def run_cli(*args, timeout=900):
    res = subprocess.run([sys.executable, "-m", "srft_mcore.evaluation.cli", *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    return res


def run_cli_here(*args):
    """``run_cli`` through main() in this process (tests/cli_main.py): a Megatron checkpoint's
    conversion forks its ranks from the warm fork server, and no interpreter starts. The
    command's own exit status and output are checked by the tests that call run_cli."""
    from cli_main import run_main
    from srft_mcore.evaluation.cli import main

    return subprocess.CompletedProcess(args, *run_main(main, args))


def last_json(res):
    return json.loads(res.stdout.strip().splitlines()[-1])


GREEDY = ["--temperature", "0", "--max-new-tokens", "48"]


@pytest.fixture(scope="module")
def hf_dir_run(embedded_files, once):
    """`srft-eval --model EMBEDDED_MODEL_DIR --data FILE.jsonl`, greedy; once per session
    (tests/conftest.py ``once``)."""
    def build(root):
        out = root / "out"
        t0 = time.time()
        res = run_cli("--model", EMBEDDED_MODEL_DIR, "--data", embedded_files[0], "--out",
                      str(out), "--template", "tokenizer", *GREEDY)
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
        print(f"srft-eval --model HF dir: {time.time() - t0:.1f}s")
        return res, out

    return once("eval_hf_dir_run", build)


@pytest.mark.slow
def test_cli_on_a_math500_style_file(hf_dir_run):
    res, out = hf_dir_run
    summary = last_json(res)
    result = summary["results"]["embedded"]
    assert (result["n"], result["metric"], result["samples"]) == (N_PROBLEMS, "pass@1", 1)
    rows = read_jsonl(out / "generations" / "embedded.jsonl")
    assert len(rows) == N_PROBLEMS
    # the JSON holds the accuracy to 6 decimals
    assert result["acc"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows), abs=5e-7)
    assert 0 < result["acc"] < 1  # the embedded model solves some problems greedily
    assert [r["id"] for r in rows] == [f"embedded/{i}" for i in range(N_PROBLEMS)]
    for r in rows:
        assert r["correct"] == (math_score(r["response"], r["answer"],
                                           r["finish_reason"])[0] > 0)
    assert json.load(open(out / "results.json"))["results"] == summary["results"]
    table = (out / "results.md").read_text()
    assert f"| embedded | {N_PROBLEMS} | pass@1 | {100 * result['acc']:.1f} |" in table
    assert summary["template"] == "tokenizer" and summary["model_kind"] == "hf"
    assert os.path.isfile(out / "sglang.log")
    assert not [n for n in os.listdir(out) if n.startswith(".hf_model")]


@pytest.fixture
def server(shared_sglang):
    """The session's SGLang server of the embedded model (tests/conftest.py)."""
    from srft_mcore.rollout.server import SGLangServer

    with shared_sglang.lease() as url:
        yield SGLangServer.attach(url)


@pytest.mark.slow
def test_evaluate_splits_through_a_live_server(server, embedded_files, tmp_path):
    from srft_mcore.models.tiny import load_tokenizer
    from srft_mcore.rollout.client import SGLangClient

    math_path, mc_path = embedded_files
    from srft_mcore.evaluation.runner import server_context_length
    from srft_mcore.config.hf_config import load_hf_config

    client = SGLangClient([server.url])  # what the trainer holds as engine.client
    assert server_context_length(server.url) == \
        load_hf_config(EMBEDDED_MODEL_DIR)["max_position_embeddings"]
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    splits = {"id_test": math_path, "mc": load_eval_set(mc_path, name="mc")}
    runs = []
    for k in range(2):
        metrics = evaluate_splits(client, tok, splits, template="tokenizer",
                                  sampling=paper_sampling(seed=7, max_new_tokens=40),
                                  n_samples=2, out_dir=str(tmp_path / f"step{k}"))
        assert set(metrics) == {f"eval/{s}/{m}" for s in ("id_test", "mc")
                                for m in ("acc", "truncation_rate", "mean_tokens")}
        for name in ("id_test", "mc"):
            rows = read_jsonl(tmp_path / f"step{k}" / f"{name}.jsonl")
            assert len(rows) == 2 * len(splits["mc"].items if name == "mc" else
                                        load_eval_set(math_path).items)
            assert metrics[f"eval/{name}/acc"] == pytest.approx(
                sum(r["correct"] for r in rows) / len(rows))
        runs.append([r["response"] for r in read_jsonl(tmp_path / f"step{k}" / "id_test.jsonl")])
    assert runs[0] == runs[1]  # seeded: the same samples again
    summary = json.load(open(tmp_path / "step0" / "results.json"))["results"]
    assert summary["id_test"]["metric"] == "avg@2" and summary["mc"]["kind"] == "choice"


@pytest.mark.slow
def test_cli_attached_to_a_url_matches_the_launched_run(server, embedded_files, hf_dir_run,
                                                        tmp_path):
    res = run_cli_here("--url", server.url, "--hf-config", EMBEDDED_MODEL_DIR, "--data",
                       embedded_files[0], "--out", str(tmp_path / "out"), "--template",
                       "tokenizer", *GREEDY)
    assert res.returncode == 0, res.stderr[-5000:]
    mine = read_jsonl(tmp_path / "out" / "generations" / "embedded.jsonl")
    theirs = read_jsonl(hf_dir_run[1] / "generations" / "embedded.jsonl")
    assert [r["response"] for r in mine] == [r["response"] for r in theirs]
    assert last_json(res)["results"]["embedded"]["acc"] == \
        last_json(hf_dir_run[0])["results"]["embedded"]["acc"]


def _save_trainer_checkpoint(root):
    """A trainer checkpoint (model + Adam state) holding the embedded model's weights."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from srft_mcore.training import checkpoint as ckpt
    from srft_mcore.models.bridge import load_hf_into_model
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model

    layout = init_distributed(1, 1)
    hf = load_hf_config(EMBEDDED_MODEL_DIR)
    model = build_model(hf, ModelConfig(), ParallelConfig())
    load_hf_into_model(model, EMBEDDED_MODEL_DIR, hf, tp_group=layout.tp_group)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0),
                                 [ddp])
    ddp.zero_grad_buffer()
    opt.step()  # zero gradients: Adam state appears, the weights stay
    return ckpt.save_checkpoint(root, 1, model, opt, {"marker": "eval"})


@pytest.mark.slow
def test_cli_on_a_trainer_checkpoint_matches_the_hf_model(embedded_files, hf_dir_run, tmp_path):
    from srft_mcore.config import Config, DataConfig, save_config
    from srft_mcore.launching.local import spawn_ranks

    run = tmp_path / "run"
    run.mkdir()
    save_config(Config(data=DataConfig(template="tokenizer")), str(run / "config.yaml"))
    step = spawn_ranks(_save_trainer_checkpoint, 1, (str(run / "checkpoints"),))[0]
    t0 = time.time()
    res = run_cli_here("--model", step, "--data", embedded_files[0], "--out",
                       str(tmp_path / "out"), *GREEDY)  # template, base model: config.yaml
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    print(f"srft-eval --model trainer checkpoint: {time.time() - t0:.1f}s")
    summary = last_json(res)
    assert (summary["model_kind"], summary["template"]) == ("trainer", "tokenizer")
    mine = read_jsonl(tmp_path / "out" / "generations" / "embedded.jsonl")
    theirs = read_jsonl(hf_dir_run[1] / "generations" / "embedded.jsonl")
    assert [r["response"] for r in mine] == [r["response"] for r in theirs]
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".hf_model")]


@pytest.mark.slow
def test_a_model_that_cannot_be_served_reports_the_server_log(embedded_files, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(EMBEDDED_MODEL_DIR, broken)
    with open(broken / "model.safetensors", "r+b") as f:  # a header that promises more
        f.truncate(4096)
    res = run_cli("--model", str(broken), "--data", embedded_files[0], "--out",
                  str(tmp_path / "out"), "--startup-timeout", "300", *GREEDY, timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "the model could not be served" in res.stderr
    assert "(tail):" in res.stderr and "SafetensorError" in res.stderr  # the log's tail
    assert "Fix:" in res.stderr
    assert last_json(res)["ok"] is False
