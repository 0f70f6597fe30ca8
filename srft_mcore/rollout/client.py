"""HTTP client for SGLang's native /generate: batched prompts, n samples each, log-probs.

Usage::

    from srft_mcore.rollout.client import SGLangClient, SamplingParams

    client = SGLangClient([server.url])                      # one or more server URLs
    groups = client.generate(["1 + 2 =", "3 * 4 ="], n=4,
                             sampling=SamplingParams(temperature=1.0, max_new_tokens=64))
    groups[0][0].token_ids, groups[0][0].text, groups[0][0].logprobs, groups[0][0].finish_reason

Prompts are strings or lists of token ids. ``generate`` returns one list of ``n``
:class:`Completion` per prompt, in prompt order. Requests (one per prompt, ``n`` samples
each) go to the least-busy server, at most ``max_concurrency`` in flight per server. A
request that fails (connection error, timeout, 5xx) is retried with exponential back-off on
another server when there is one; when the retries are spent, :class:`GenerateError` names
the servers that failed, so the caller (the rollout engine) can restart them and retry.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import requests

Prompt = Union[str, Sequence[int]]


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Generation length limit."""
    stop: Optional[list] = None
    """Stop strings (not included in the returned text)."""
    stop_token_ids: Optional[list] = None
    """Extra token ids that end generation (EOS always does unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks, exact-length tests)."""
    seed: Optional[int] = None
    """Reproducible sampling (see rollout/seeded.py): sample j of prompt i uses the seed
    mix_seed(seed, i, j); needs a server started with --enable-custom-logit-processor."""

    def to_json(self, n: int) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and k != "seed"}
        out["n"] = n
        return out

    def seeded_requests(self, prompt_index: int, n: int) -> list:
        """Extra payload of the n single-sample requests of one prompt in seeded mode."""
        from srft_mcore.rollout.seeded import GumbelMaxSampling, mix_seed

        if self.top_p < 1.0:
            raise ValueError("seeded sampling does not support top_p < 1")
        processor = GumbelMaxSampling.to_str()
        base = {k: v for k, v in self.to_json(1).items()}
        base["temperature"] = 0.0  # argmax of the Gumbel-perturbed logits
        return [{"sampling_params": dict(base, custom_params={
                    "seed": mix_seed(self.seed, prompt_index, j),
                    "temperature": self.temperature}),
                 "custom_logit_processor": processor} for j in range(n)]


@dataclass
class Completion:
    """One sampled continuation."""

    token_ids: list
    """Generated token ids (prompt excluded)."""
    text: str
    """Decoded generated text."""
    logprobs: list
    """Per generated token: the sampling-policy log-prob SGLang computed (None if not asked)."""
    finish_reason: str
    """'stop' (EOS / stop string / stop token), 'length' or 'abort'."""
    prompt_tokens: int = 0
    """Prompt length in tokens as the server saw it."""
    weight_version: Optional[str] = None
    """Weight version the server reported for this request."""
    server: str = ""
    """URL of the server that produced it."""


class GenerateError(RuntimeError):
    """Requests failed after all retries; ``failed_urls`` lists the servers that failed."""

    def __init__(self, message: str, failed_urls: Sequence[str]):
        super().__init__(message)
        self.failed_urls = list(failed_urls)


class _Retryable(Exception):
    pass


def parse_completion(item: dict, url: str) -> Completion:
    meta = item.get("meta_info", {})
    lp = meta.get("output_token_logprobs")
    ids = item.get("output_ids")
    if ids is None and lp is not None:
        ids = [t[1] for t in lp]
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    return Completion(
        token_ids=list(ids or []), text=item.get("text", ""),
        logprobs=[t[0] for t in lp] if lp is not None else None,
        finish_reason=reason, prompt_tokens=int(meta.get("prompt_tokens", 0)),
        weight_version=meta.get("weight_version"), server=url)


class SGLangClient:
    """Client-side load balancing over one or more SGLang servers."""

    def __init__(self, urls: Sequence[str], max_concurrency: int = 64,
                 request_timeout_s: float = 600.0, retries: int = 3, backoff_s: float = 0.5):
        if not urls:
            raise ValueError("SGLangClient needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.max_concurrency = max_concurrency
        self.request_timeout_s = request_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._inflight = {u: 0 for u in self.urls}
        self._cond = threading.Condition()
        self._local = threading.local()

    def set_urls(self, urls: Sequence[str]) -> None:
        with self._cond:
            self.urls = [u.rstrip("/") for u in urls]
            self._inflight = {u: self._inflight.get(u, 0) for u in self.urls}
            self._cond.notify_all()

    # ------------------------------------------------------------------ balancing
    def _acquire(self, avoid: set) -> str:
        with self._cond:
            while True:
                pool = [u for u in self.urls if u not in avoid] or list(self.urls)
                url = min(pool, key=lambda u: self._inflight[u])
                if self._inflight[url] < self.max_concurrency:
                    self._inflight[url] += 1
                    return url
                self._cond.wait()

    def _release(self, url: str) -> None:
        with self._cond:
            if url in self._inflight:
                self._inflight[url] -= 1
            self._cond.notify_all()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    # ------------------------------------------------------------------ requests
    def post(self, url: str, path: str, payload: dict, timeout_s: Optional[float] = None):
        """POST JSON; connection errors, timeouts and 5xx raise ``_Retryable``."""
        try:
            r = self._session().post(url + path, json=payload,
                                     timeout=timeout_s or self.request_timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Retryable(f"{url}{path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 500:
            raise _Retryable(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code != 200:
            raise RuntimeError(f"{url}{path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def _one(self, prompt: Prompt, n: int, sampling: SamplingParams,
             return_logprob: bool, prompt_index: int = 0) -> list[Completion]:
        if sampling.seed is not None and sampling.temperature > 0:
            return [c for extra in sampling.seeded_requests(prompt_index, n)
                    for c in self._request(prompt, 1, extra, return_logprob)]
        return self._request(prompt, n, {"sampling_params": sampling.to_json(n)}, return_logprob)

    def _request(self, prompt: Prompt, n: int, extra: dict,
                 return_logprob: bool) -> list[Completion]:
        payload = {**extra, "return_logprob": return_logprob}
        if isinstance(prompt, str):
            payload["text"] = prompt
        else:
            payload["input_ids"] = [int(t) for t in prompt]
        failed: list[str] = []
        errors: list[str] = []
        for attempt in range(self.retries + 1):
            url = self._acquire(set(failed))
            try:
                body = self.post(url, "/generate", payload)
            except _Retryable as e:
                failed.append(url)
                errors.append(str(e))
                time.sleep(self.backoff_s * (2 ** attempt))
                continue
            finally:
                self._release(url)
            items = body if isinstance(body, list) else [body]
            if len(items) != n:
                raise RuntimeError(f"{url}/generate returned {len(items)} samples, asked {n}")
            return [parse_completion(it, url) for it in items]
        raise GenerateError(f"/generate failed {self.retries + 1} times: {errors[-1]}",
                            sorted(set(failed)))

    def generate(self, prompts: Sequence[Prompt], n: int = 1,
                 sampling: Optional[SamplingParams] = None,
                 return_logprob: bool = True) -> list[list[Completion]]:
        """Sample ``n`` continuations per prompt; one list of Completions per prompt."""
        sampling = sampling or SamplingParams()
        if not prompts:
            return []
        workers = min(len(prompts), self.max_concurrency * len(self.urls))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self._one, p, n, sampling, return_logprob, i)
                       for i, p in enumerate(prompts)]
            results, failed = [], []
            for f in futures:
                try:
                    results.append(f.result())
                except GenerateError as e:
                    failed.append(e)
                    results.append(None)
        if failed:
            urls = sorted({u for e in failed for u in e.failed_urls})
            raise GenerateError(f"{len(failed)}/{len(prompts)} prompts failed; first: {failed[0]}",
                                urls)
        return results

    # ------------------------------------------------------------------ control endpoints
    def get(self, url: str, path: str, timeout_s: float = 30.0):
        r = self._session().get(url + path, timeout=timeout_s)
        r.raise_for_status()
        return r.json()

    def weight_version(self, url: str) -> Optional[str]:
        return self.get(url, "/model_info").get("weight_version")
