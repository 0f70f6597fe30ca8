"""Strict scoring shared by the training reward and every evaluation: cut-off or unfinished
responses score 0, the rule that decided each score is named, multiple-choice letters are not
taken from words, --no-shuffle is refused where the gold option never moves, and srft-eval
reports the truncation rate and mean length (against a fake SGLang server)."""
import json
import threading
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from fake_http import JsonHandler
from srft_mcore.evaluation import cli
from srft_mcore.evaluation.errors import EvalError
from srft_mcore.data import loading
from srft_mcore.evaluation.records import EvalItem, check_unshuffled, load_eval_set
from srft_mcore.evaluation.scoring import choice_letter, extract_choice, score_response
from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR
from srft_mcore.reward import math_reward, score_batch, strict_math_score
from srft_mcore.rollout.client import Completion

CUT_OFF = "<think> 5 + 3 = 8. 8 * 2 = 16."


def write_jsonl(path, rows):
    return loading.write_jsonl(str(path), rows)


def math_item(answer):
    return EvalItem(index=0, id=None, question="q", prompt="q", answer=answer)


# --------------------------------------------------------------------------- math rules
@pytest.mark.parametrize("response, answer, finish, expected", [
    (CUT_OFF, "16", "stop", (0.0, None, "no_answer")),           # reasoning never ended
    ("<think> ... 16 - 1 = 15. 15 +", "15", "stop", (0.0, None, "no_answer")),
    ("<think> 5 + 3 = 8. 8 * 2 = 16. </think>", "16", "stop", (0.0, None, "no_answer")),
    ("<think> 8 * 2 = 16. </think>   \n", "16", "stop", (0.0, None, "no_answer")),
    ("The answer is 16", "16", "stop", (1.0, "16", "after_think")),  # no think block at all
    ("<think> The answer is 16", "16", "stop", (0.0, None, "no_answer")),  # never closed
    ("<think> 8 * 2 = 16. </think> \\boxed{16}", "16", "stop", (1.0, "16", "boxed")),
    ("<think> 8 * 2 = 16. </think> \\boxed{15}", "16", "stop", (0.0, "15", "boxed")),
    ("<think> 8 * 2 = 16. </think> 16", "16", "stop", (1.0, "16", "after_think")),
    ("<think> 8 * 2 = 16. </think> so 15", "16", "stop", (0.0, "15", "after_think")),
    ("<think> x </think> no number here", "16", "stop", (0.0, None, "no_answer")),
    # stopped by the length limit: 0 whatever the text holds, even a complete box
    ("<think> 8 * 2 = 16. </think> \\boxed{16}", "16", "length", (0.0, "16", "truncated")),
    ("<think> 8 * 2 = 16. </think> 16", "16", "length", (0.0, None, "truncated")),
    (CUT_OFF, "16", "length", (0.0, None, "truncated")),
])
def test_strict_math_rules(response, answer, finish, expected):
    assert tuple(strict_math_score(response, answer, finish)) == expected
    assert tuple(score_response(math_item(answer), response, finish)) == expected


def test_training_reward_is_boxed_only_and_agrees_with_the_strict_rules():
    assert math_reward(CUT_OFF, "16", None) == 0.0
    assert math_reward("<think> 16 </think> 16", "16", None) == 0.0  # wants a box
    assert math_reward("<think> 16 </think> \\boxed{16}", "16", None) == 1.0
    assert tuple(strict_math_score("<think> 16 </think> 16", "16", boxed_only=True)) == \
        (0.0, None, "no_answer")


def test_truncated_rollouts_score_0_in_training_whatever_the_reward_fn_says():
    from srft_mcore.training.rollout_side import RolloutSide

    seen = []

    def generous(response, answer, prompt):
        seen.append(response)
        return 1.0

    side = RolloutSide(cfg=None, layout=SimpleNamespace(rank=0), tokenizer=None, dataset=None,
                       sampler=None, reward_fn=generous)
    comps = [Completion(token_ids=[1], text=t, logprobs=None, finish_reason=f)
             for t, f in (("done", "stop"), ("cut", "length"), ("also done", "stop"))]
    example = SimpleNamespace(answer="16", prompt="q")
    assert side.score([example], [comps]) == [[1.0, 0.0, 1.0]]
    assert seen == ["done", "also done"]  # the cut-off one never reached the user function
    # the registered math reward through the same path: a complete box cut off scores 0
    side.reward_fn = math_reward
    boxed = [Completion(token_ids=[1], text="\\boxed{16}", logprobs=None, finish_reason=f)
             for f in ("stop", "length")]
    assert side.score([example], [boxed]) == [[1.0, 0.0]]
    assert score_batch(math_reward, ["\\boxed{16}"], ["16"]) == [1.0]  # no reasons: scored


# --------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize("response, n, expected", [
    ("The correct option is C. A careful check confirms it.", 4, ("C", "choice_cue")),
    ("the answer I believe is (B)", 10, ("B", "choice_letter")),
    ("Answer: c", 4, ("C", "choice_cue")),
    ("answer: (d).", 4, ("D", "choice_cue")),
    ("The choice is **B**", 4, ("B", "choice_cue")),
    ("<think> A or B? </think> \\boxed{b}", 4, ("B", "choice_boxed")),
    ("A careful reading points to D", 4, ("D", "choice_letter")),
    ("I believe so", 10, (None, "no_answer")),      # a pronoun, not option I
    ("the answer is a bit unclear", 4, (None, "no_answer")),  # an article, not option A
    ("c is my guess", 4, (None, "no_answer")),      # lowercase counts only after a cue
    ("Answer: E", 4, (None, "no_answer")),          # not one of the options
])
def test_choice_extraction(response, n, expected):
    assert choice_letter(response, n) == expected
    assert extract_choice(response, n) == expected[0]


def test_choice_scoring_names_the_rule_and_drops_truncated():
    item = EvalItem(index=0, id=None, question="q", prompt="q", answer="C",
                    choices=["x", "y", "z", "w"])
    assert tuple(score_response(item, "Answer: c", "stop")) == (1.0, "C", "choice_cue")
    assert tuple(score_response(item, "Answer: C", "length")) == (0.0, "C", "truncated")
    assert tuple(score_response(item, "The correct option is C. A careful check", "stop")) \
        == (1.0, "C", "choice_cue")


# --------------------------------------------------------------------------- --no-shuffle
def _gold_first(tmp_path, n=3):
    return write_jsonl(tmp_path / f"gpqa{n}.jsonl", [
        {"Question": f"q{i}", "Correct Answer": f"right {i}",
         **{f"Incorrect Answer {k}": f"wrong {i}.{k}" for k in (1, 2, 3)}} for i in range(n)])


def test_no_shuffle_refused_when_the_gold_option_never_moves(tmp_path, monkeypatch, capsys):
    path = _gold_first(tmp_path)
    with pytest.raises(EvalError, match=r"correct option is A in all 3 items.*"
                                        r"Fix: drop --no-shuffle"):
        check_unshuffled(load_eval_set(path, shuffle=False))
    check_unshuffled(load_eval_set(path))  # shuffled: fine
    check_unshuffled(load_eval_set(_gold_first(tmp_path, n=1), shuffle=False))  # one item
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"question": "q0", "options": ["a", "b"], "answer": 0},
        {"question": "q1", "options": ["a", "b"], "answer": 1}])
    check_unshuffled(load_eval_set(mixed, shuffle=False))  # the gold moves: fine

    def no_server(*a, **k):
        raise AssertionError("no server may start")

    monkeypatch.setattr(cli, "_launch", no_server)
    out = tmp_path / "out"
    rc = cli.main(["--model", EMBEDDED_MODEL_DIR, "--data", path, "--no-shuffle",
                   "--out", str(out)])
    err = capsys.readouterr()
    assert rc == 2
    assert "--no-shuffle" in err.err and "Fix: drop --no-shuffle" in err.err
    assert json.loads(err.out.strip().splitlines()[-1])["ok"] is False
    assert not out.exists()


# --------------------------------------------------------------------------- srft-eval, fake server
N_DONE, N_CUT = 5, 5
DONE_TOKENS, CUT_TOKENS = 12, 40


class ScriptedSGLang(JsonHandler):
    """/generate answers problem k ("Start with k, add 1.", gold k + 1) with a complete boxed
    answer for k < N_DONE, else with reasoning cut off by the length limit that ends in the
    gold number; /v1/models reports a context length."""

    def do_GET(self):
        if self.path == "/v1/models":
            return self._reply(200, {"data": [{"id": "fake", "max_model_len": 4096}]})
        self._reply(200, {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path != "/generate":
            return self._reply(404, {"detail": "Not Found"})
        prompt = self.server.tokenizer.decode(body["input_ids"])
        k = next(k for k in range(N_DONE + N_CUT) if f"Start with {k}," in prompt)
        if k < N_DONE:
            text, reason, ntok = f"<think> {k} + 1 = {k + 1} </think> \\boxed{{{k + 1}}}", \
                {"type": "stop", "matched": 2}, DONE_TOKENS
        else:
            text, reason, ntok = f"<think> {k} + 1 = {k + 1}. So {k + 1}", \
                {"type": "length", "length": CUT_TOKENS}, CUT_TOKENS
        self.server.requests.append(body["sampling_params"])
        self._reply(200, {"text": text, "output_ids": [5] * ntok,
                          "meta_info": {"finish_reason": reason, "prompt_tokens": 3}})


@pytest.fixture
def scripted_server():
    from srft_mcore.models.tiny import load_tokenizer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedSGLang)
    httpd.tokenizer = load_tokenizer(EMBEDDED_MODEL_DIR)
    httpd.requests = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def test_srft_eval_scores_cut_off_answers_0_and_reports_truncation(tmp_path, scripted_server,
                                                                   capsys):
    url, httpd = scripted_server
    data = write_jsonl(tmp_path / "add.jsonl", [
        {"problem": f"Start with {k}, add 1.", "answer": str(k + 1), "unique_id": f"u{k}"}
        for k in range(N_DONE + N_CUT)])
    out = tmp_path / "out"
    rc = cli.main(["--url", url, "--hf-config", EMBEDDED_MODEL_DIR, "--data", data,
                   "--out", str(out), "--template", "tokenizer", "--max-new-tokens",
                   str(CUT_TOKENS)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert len(httpd.requests) == N_DONE + N_CUT
    result = json.loads(printed.out.strip().splitlines()[-1])["results"]["add"]
    assert result["acc"] == 0.5
    assert result["truncation_rate"] == 0.5
    assert result["mean_tokens"] == (N_DONE * DONE_TOKENS + N_CUT * CUT_TOKENS) / 10
    assert result["rules"] == {"boxed": N_DONE, "truncated": N_CUT}
    assert json.load(open(out / "results.json"))["results"]["add"] == result
    rows = [json.loads(line) for line in open(out / "generations" / "add.jsonl")]
    by_id = {r["id"]: r for r in rows}
    for k in range(N_DONE + N_CUT):
        r = by_id[f"u{k}"]
        assert r["rule"] == ("boxed" if k < N_DONE else "truncated")
        assert r["correct"] == (k < N_DONE)
        if k >= N_DONE:  # the cut-off ones end in the gold number, which is no answer
            assert r["finish_reason"] == "length" and r["response"].endswith(f"So {k + 1}")
    table = (out / "results.md").read_text()
    assert "| truncated (%) | mean tokens |" in table
    assert f"| add | 10 | pass@1 | 50.0 | 50.0 | {result['mean_tokens']:.1f} |" in table
    assert "truncated 50.0%" in printed.out


def test_evaluate_splits_returns_the_per_split_metrics(tmp_path, scripted_server):
    from srft_mcore.evaluation.runner import evaluate_splits, paper_sampling
    from srft_mcore.models.tiny import load_tokenizer

    url, _ = scripted_server
    data = write_jsonl(tmp_path / "add.jsonl", [
        {"problem": f"Start with {k}, add 1.", "answer": str(k + 1)}
        for k in range(N_DONE + N_CUT)])
    metrics = evaluate_splits(url, load_tokenizer(EMBEDDED_MODEL_DIR), {"add": data},
                              template="tokenizer", sampling=paper_sampling(max_new_tokens=40),
                              out_dir=str(tmp_path / "step"))
    assert metrics == {"eval/add/acc": 0.5, "eval/add/truncation_rate": 0.5,
                       "eval/add/mean_tokens": (N_DONE * DONE_TOKENS + N_CUT * CUT_TOKENS) / 10}
    saved = json.load(open(tmp_path / "step" / "results.json"))["results"]["add"]
    assert (saved["acc"], saved["truncation_rate"]) == (0.5, 0.5)
