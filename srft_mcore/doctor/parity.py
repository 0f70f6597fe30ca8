"""Logit parity: a Megatron model loaded through the bridge vs the transformers model.

:func:`parity_check` computes the transformers logits of a fixed token batch, then runs
``tp * pp`` gloo ranks that build the Megatron model, load the HF weights with
:func:`srft_mcore.models.bridge.load_hf_into_model` (each rank its own slices), run the forward
pass through the pipeline and compare the first ``vocab_size`` logits. Used by
``srft-doctor parity`` and by the bridge tests (which also check the HF round trip from
the same ranks, see :func:`run_rank`).
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Optional

import torch


def reference_logits(hf_dir: str, tokens_bs: torch.Tensor) -> torch.Tensor:
    """transformers fp32 logits [b, s, vocab] of ``tokens_bs``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens_bs).logits.float()


def sample_tokens(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def pipeline_forward(model, tokens_bs: torch.Tensor, layout) -> Optional[torch.Tensor]:
    """Forward through this rank's stage with explicit p2p between stages.

    Returns the full-vocab (padded) logits [b, s, v] on the last stage, None elsewhere.
    """
    import torch.distributed as dist

    b, s = tokens_bs.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    if not layout.is_first_stage:
        hidden_sbh = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden_sbh, src=dist.get_global_rank(layout.pp_group, layout.pp_rank - 1))
        model.set_input_tensor(hidden_sbh)
    with torch.no_grad():
        out = model(tokens_bs, position_ids, None)
    if not layout.is_last_stage:
        dist.send(out.contiguous(), dst=dist.get_global_rank(layout.pp_group, layout.pp_rank + 1))
        return None
    if layout.tp == 1:
        return out
    parts = [torch.empty_like(out) for _ in range(layout.tp)]
    dist.all_gather(parts, out.contiguous(), group=layout.tp_group)
    return torch.cat(parts, dim=-1)


def run_rank(tp: int, pp: int, cases: list, pp_layer_split: Optional[list] = None,
             round_trip: bool = False) -> list:
    """Body of one rank: for each case ``{'hf_dir', 'ref'}`` the max abs logit difference.

    ``ref`` is a ``torch.save``d dict with ``tokens`` and ``logits``. With ``round_trip``,
    the model's weights are also gathered to rank 0 (:func:`bridge.gather_hf_weights`) and
    compared bit for bit with the HF files; rank 0 reports the mismatching tensors.
    """
    import torch.distributed as dist

    from srft_mcore.models.bridge import HFCheckpoint, gather_hf_weights, load_hf_into_model
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model

    layout = init_distributed(tp=tp, pp=pp)
    results = []
    for case in cases:
        hf = load_hf_config(case["hf_dir"])
        ref = torch.load(case["ref"])
        model = build_model(hf, ModelConfig(dtype="float32", transformer_impl="local"),
                            ParallelConfig(tp=tp, pp=pp, pp_layer_split=pp_layer_split))
        model.eval()
        load_hf_into_model(model, case["hf_dir"], hf, tp_group=layout.tp_group)
        logits = pipeline_forward(model, ref["tokens"], layout)
        diff = torch.tensor(0.0, dtype=torch.float64)
        padded_max = torch.tensor(0.0, dtype=torch.float64)
        if logits is not None:
            v = hf["vocab_size"]
            diff += (logits[..., :v].float() - ref["logits"]).abs().max().double()
            if logits.shape[-1] > v:  # padded rows are zero, so their logits are exactly 0
                padded_max += logits[..., v:].abs().max().double()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        dist.all_reduce(padded_max, op=dist.ReduceOp.MAX)
        res = {"hf_dir": case["hf_dir"], "max_abs_diff": diff.item(),
               "padded_logits_max": padded_max.item(), "tp": tp, "pp": pp,
               "vocab_size": hf["vocab_size"], "padded_vocab_size": int(model.vocab_size)}
        if round_trip:
            mismatches, seen = [], set()
            src = HFCheckpoint(case["hf_dir"], hf) if layout.rank == 0 else None
            for name, t in gather_hf_weights(model, hf, layout.tp_group, layout.pp_group):
                seen.add(name)
                want = src.get(name)
                if want.dtype != t.dtype or want.shape != t.shape or not torch.equal(want, t):
                    mismatches.append(name)
            if layout.rank == 0:
                missing = sorted(set(src.location) - seen)
                res.update(round_trip_mismatches=mismatches, round_trip_missing=missing,
                           round_trip_tensors=len(seen))
        results.append(res)
        del model
    return results


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_layout(hf: dict, hf_dir: str, tp: int, pp: int,
                 pp_layer_split: Optional[list] = None) -> None:
    """Raise ConfigError (naming the flag, the model's size and the fix) when ``tp`` x ``pp``
    cannot split this model; called before any rank or process group starts."""
    from srft_mcore.config import ConfigError
    from srft_mcore.models import get_architecture

    get_architecture(hf)
    if tp < 1 or pp < 1:
        raise ConfigError(f"--tp {tp} --pp {pp}: sizes must be >= 1. Fix: e.g. --tp 1 --pp 1")
    heads = hf["num_attention_heads"]
    sizes = {"num_attention_heads": heads,
             "num_key_value_heads": hf.get("num_key_value_heads") or heads,
             "intermediate_size": hf["intermediate_size"]}
    for what, n in sizes.items():
        if n % tp:
            common = math.gcd(*sizes.values())
            raise ConfigError(f"--tp {tp} does not divide {what} ({n}) of the model in "
                              f"{hf_dir} (tensor parallelism splits it over the TP ranks). "
                              f"Fix: choose --tp from {_divisors(common)}")
    layers = hf["num_hidden_layers"]
    if pp_layer_split is None and layers % pp:
        raise ConfigError(f"--pp {pp} does not divide num_hidden_layers ({layers}) of the "
                          f"model in {hf_dir}. Fix: choose --pp from {_divisors(layers)}")


def parity_check(hf_dir: str, tp: int = 1, pp: int = 1, batch: int = 2, seq_len: int = 16,
                 pp_layer_split: Optional[list] = None, timeout_s: float = 900.0) -> dict:
    """Max abs difference of Megatron (``tp`` x ``pp`` gloo ranks) vs transformers logits."""
    from srft_mcore.models.name_map import check_tp
    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.config.hf_config import load_hf_config

    hf = load_hf_config(hf_dir)
    check_layout(hf, hf_dir, tp, pp, pp_layer_split)
    check_tp(hf, tp)
    tokens = sample_tokens(hf["vocab_size"], batch, seq_len)
    with tempfile.TemporaryDirectory(prefix="srft_parity_") as tmp:
        ref = os.path.join(tmp, "ref.pt")
        torch.save({"tokens": tokens, "logits": reference_logits(hf_dir, tokens)}, ref)
        out = spawn_ranks(run_rank, tp * pp,
                          (tp, pp, [{"hf_dir": hf_dir, "ref": ref}], pp_layer_split),
                          timeout_s=timeout_s)
    res = out[0][0]
    res.update(model_type=hf.get("model_type"), batch=batch, seq_len=seq_len)
    return res
