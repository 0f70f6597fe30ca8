"""Reproducible sampling on any SGLang backend: Gumbel-max with a per-sample seed.

SGLang's own seeded sampling needs ``--enable-deterministic-inference``, which the CPU
attention backend does not support. Instead, the server applies :class:`GumbelMaxSampling`
as a custom logit processor and decodes greedily: adding Gumbel noise
``g = -log(-log(u))`` to ``z / T`` and taking the argmax draws exactly from
``softmax(z / T)`` (the Gumbel-max trick). The noise is a pure function of
(seed, position, vocabulary index), so a sample depends only on its seed and the weights,
not on batching, server restarts or the order of requests; a resumed run therefore
regenerates the rollouts of the run it continues. top-p is not supported in this mode.
"""
from __future__ import annotations

import torch
from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

_MASK64 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style mixing; stable across processes)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK64


class GumbelMaxSampling(CustomLogitProcessor):
    """logits -> logits / T + Gumbel(seed, position); the server then takes the argmax."""

    def __call__(self, logits, custom_param_list=None):
        out = logits.float().clone()
        for row, params in enumerate(custom_param_list or []):
            req = params.get("__req__")
            position = len(req.output_ids) if req is not None else 0
            gen = torch.Generator().manual_seed(mix_seed(params["seed"], position))
            u = torch.rand(out.shape[-1], generator=gen, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
            out[row] = out[row] / float(params["temperature"]) + gumbel.to(out.device, out.dtype)
        return out
