"""The layout search: every TP x PP x DP layout and rollout placement (colocated, or
dedicated rollout GPUs) evaluated for memory and speed, ranked, and per TP size why it does
or does not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from srft_mcore.planning.memory_estimate import StageMemory, trainer_memory
from srft_mcore.planning.model_shape import ModelShape
from srft_mcore.planning.rollout_estimate import RolloutPlan, rollout_plan
from srft_mcore.planning.run_shape import GB, Assumptions, Hardware, Layout, RunShape
from srft_mcore.planning.throughput_estimate import step_seconds, sync_seconds, trainer_seconds


@dataclass
class Plan:
    layout: Layout
    rollout: RolloutPlan
    trainer_gpus: int
    memory: StageMemory
    fits: bool
    why: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    tokens_per_s: float = 0.0
    pp_split: Optional[list] = None
    options: dict = field(default_factory=dict)
    """Peak GB with the optimizer/recompute options toggled (:func:`memory_options`)."""

    def label(self) -> str:
        r = self.rollout
        where = "colocated" if r.mode == "colocated" else f"{r.gpus} GPUs"
        return (f"TP{self.layout.tp} PP{self.layout.pp} DP{self.layout.dp} | rollout "
                f"{where} ({r.servers} x TP{r.server_tp})")


def _divisors(n: int) -> list:
    return [k for k in range(1, n + 1) if n % k == 0]


def tp_candidates(m: ModelShape) -> list:
    """TP sizes the bridge accepts: dividing both the attention heads and the key/value
    heads (so TP is at most g)."""
    return [t for t in _divisors(m.kv_heads) if m.heads % t == 0]


def pp_candidates(m: ModelShape) -> list:
    """Pipeline sizes 1..16 with at least 2 layers per stage; when p does not divide L the
    stages differ by one layer (train with ``parallel.pp_layer_split``, see
    :func:`pp_layer_split`)."""
    return [p for p in range(1, 17) if m.layers // p >= 2]


def pp_layer_split(m: ModelShape, pp: int) -> Optional[list]:
    """Layers per stage for an uneven split (the first stages one layer more), else None."""
    if m.layers % pp == 0:
        return None
    base, extra = divmod(m.layers, pp)
    return [base + 1] * extra + [base] * (pp - extra)


def server_tp_candidates(m: ModelShape, gpus: int, hw: Hardware) -> list:
    """SGLang TP sizes: dividing the attention heads and the GPUs given, within a node."""
    return [t for t in (1, 2, 4, 8) if m.heads % t == 0 and gpus % t == 0
            and t <= hw.gpus_per_node]


def fit_reasons(mem: StageMemory, hw: Hardware) -> list:
    """Why a trainer GPU overflows: the total against the card and its largest terms."""
    cap = hw.gpu_mem_gb * GB
    if mem.peak <= cap:
        return []
    terms = {k: v for k, v in mem.terms.items() if not k.endswith("transient")}
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in top)
    return [f"trainer ({mem.stage} stage): {mem.peak / GB:.1f} GB > {hw.gpu_mem_gb:g} GB "
            f"(largest: {parts} GB)"]


def memory_options(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool) -> dict:
    """Peak GB of the layout's fullest GPU with and without the distributed optimizer and
    full recomputation."""
    out = {}
    for dist_opt in (True, False):
        for rc in (False, True):
            key = ("distopt" if dist_opt else "no_distopt") + ("_recompute" if rc else "")
            mem = trainer_memory(m, run, replace(lay, distributed_optimizer=dist_opt,
                                                 recompute=rc), a, colocated)
            out[key] = round(mem.peak / GB, 1)
    return out


def best_rollout(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, gpus: int,
                 trainer_resident: int, colocated: bool) -> RolloutPlan:
    """The fastest server TP that fits; when none does, the one with the most KV room."""
    options = [rollout_plan(m, run, hw, a, gpus, stp, trainer_resident, colocated)
               for stp in server_tp_candidates(m, gpus, hw)]
    fitting = [o for o in options if o.fits]
    if fitting:
        return min(fitting, key=lambda o: (o.seconds, o.server_tp))
    if options:
        return max(options, key=lambda o: (o.kv_gb_per_gpu, o.server_tp))
    return RolloutPlan("colocated" if colocated else "dedicated", gpus, 0, 0, False, 0.0, 0,
                       math.inf, f"sglang: no server TP divides {gpus} GPUs and {m.heads} heads")


def evaluate(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, tp: int, pp: int,
             dp: int, rollout_gpus: int, colocated: bool) -> Plan:
    """One layout + rollout split: memory (no recompute if it fits, else full recompute),
    the best server TP, step time and tokens/s."""
    sp = a.spec == "te" and tp > 1
    lay = Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=sp)
    mem = trainer_memory(m, run, lay, a, colocated)
    if mem.peak > hw.gpu_mem_gb * GB:
        lay = replace(lay, recompute=True)
        mem = trainer_memory(m, run, lay, a, colocated)
    why = fit_reasons(mem, hw)
    mini = run.prompts_per_step // run.mini_batches
    if mini % dp:
        why.append(f"config: {mini} prompts per mini-batch are not divisible by DP {dp}")
    resident = mem.resident - mem.terms.get("sglang_released", 0) if colocated else 0
    rollout = best_rollout(m, run, hw, a, hw.gpus if colocated else rollout_gpus, resident,
                           colocated)
    if not rollout.fits:
        why.append(rollout.why)
    times = {"rollout_s": rollout.seconds,
             "reward_s": run.prompts_per_step * run.n_samples * a.reward_s_per_sample,
             "train_s": trainer_seconds(m, run, lay, hw, a), "sync_s": sync_seconds(m, a)}
    total = step_seconds(times, overlapped=run.overlap and not colocated)
    times["step_s"] = total
    return Plan(layout=lay, rollout=rollout, trainer_gpus=lay.gpus, memory=mem,
                fits=not why, why=why, times=times, pp_split=pp_layer_split(m, pp),
                options=memory_options(m, run, lay, a, colocated),
                tokens_per_s=run.tokens / total if math.isfinite(total) else 0.0)


def rollout_splits(hw: Hardware, fixed: Optional[int]) -> list:
    """Dedicated rollout GPU counts to try: the one given, else every count leaving the
    trainer at least one GPU (whole nodes beyond 8 GPUs)."""
    if fixed is not None:
        return [fixed]
    step = hw.gpus_per_node if hw.gpus > hw.gpus_per_node else 1
    return list(range(step, hw.gpus, step))


def search(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
           rollout_gpus: Optional[int] = None, colocated: Optional[bool] = None) -> list:
    """Every TP x PP x DP layout and rollout placement (colocated on all GPUs, or dedicated
    rollout GPUs beside the trainer), evaluated; fitting plans first, fastest first."""
    placements = []
    if colocated is not False and rollout_gpus is None:
        placements.append((hw.gpus, 0, True))
    if not colocated:
        placements += [(hw.gpus - k, k, False) for k in rollout_splits(hw, rollout_gpus)]
    plans = []
    for train_gpus, k, coloc in placements:
        for tp in tp_candidates(m):
            for pp in pp_candidates(m):
                if train_gpus % (tp * pp):
                    continue
                plans.append(evaluate(m, run, hw, a, tp, pp, train_gpus // (tp * pp), k, coloc))
    plans.sort(key=lambda p: (not p.fits, -p.tokens_per_s, p.memory.peak))
    return plans


def _config_ok(p: Plan) -> bool:
    return not any(w.startswith("config:") for w in p.why)


def _explain(plans: list) -> Optional[dict]:
    """The best fitting plan of ``plans``, else the config-valid one with the least trainer
    memory, with its reasons."""
    good = [p for p in plans if p.fits]
    if good:
        return {"fits": True, "plan": good[0].label(), "tokens_per_s": round(good[0].tokens_per_s)}
    valid = [p for p in plans if _config_ok(p)]
    if not valid:
        return None
    p = min(valid, key=lambda p: (p.memory.peak, -p.rollout.kv_gb_per_gpu))
    return {"fits": False, "plan": p.label(), "why": p.why}


def _explain_placements(plans: list) -> dict:
    """The best fitting plan, or per rollout placement why none fits."""
    best = _explain(plans)
    if best is None or best["fits"]:
        return {"fits": bool(best), "best": best}
    return {"fits": False, "why_not": {mode: _explain([p for p in plans if p.rollout.mode == mode])
                                       for mode in ("colocated", "dedicated")}}


def tp_summary(plans: list, m: ModelShape) -> dict:
    """Per TP size: its best plan, or for each rollout placement why none fits (the reasons
    of the layout needing the least memory); the same for its plain TP x DP layouts (PP1)."""
    out = {}
    for tp in tp_candidates(m):
        mine = [p for p in plans if p.layout.tp == tp]
        out[f"TP{tp}"] = {**_explain_placements(mine),
                          "pp1": _explain_placements([p for p in mine if p.layout.pp == 1])}
    return out
