"""The layout search: every TP x PP x DP layout and rollout placement (colocated, or
dedicated rollout GPUs) evaluated for memory and speed, ranked, and per TP size why it does
or does not fit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from srft_mcore.planning.memory_estimate import (StageMemory, balanced_layer_split,
                                                 trainer_memory)
from srft_mcore.planning.model_shape import ModelShape
from srft_mcore.planning.plan_config import config_problem, hf_shape, plan_config
from srft_mcore.planning.rollout_estimate import RolloutPlan, rollout_plan
from srft_mcore.planning.run_shape import GB, Assumptions, Hardware, Layout, RunShape
from srft_mcore.planning.throughput_estimate import (offload_seconds, step_seconds,
                                                     sync_seconds, trainer_seconds)


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
    offload: str = "none"
    """rollout.offload: the assumption's for colocated plans, none for dedicated ones."""
    kv_gain_gb: float = 0.0
    """Colocated: KV room per GPU the offload frees against offload none."""
    config: dict = field(default_factory=dict)
    """The trainer config keys the plan sets (:func:`plan_config.plan_config`)."""

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
    stages differ by one layer (``parallel.pp_layer_split``, from
    :func:`pp_layer_split`)."""
    return [p for p in range(1, 17) if m.layers // p >= 2]


def pp_layer_split(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool = False) -> Optional[list]:
    """Layers per stage for an uneven split, the extra layers on the stages with the least
    memory (:func:`memory_estimate.balanced_layer_split`), else None."""
    return balanced_layer_split(m, run, lay, a, colocated)


def server_tp_candidates(m: ModelShape, gpus: int, hw: Hardware) -> list:
    """SGLang TP sizes: dividing the attention heads and the GPUs given, each server inside
    one node (a server spans no nodes: beyond one node its TP divides gpus_per_node, so
    every node hosts gpus_per_node / TP whole servers)."""
    return [t for t in (1, 2, 4, 8) if m.heads % t == 0 and gpus % t == 0
            and t <= hw.gpus_per_node and (gpus <= hw.gpus_per_node or hw.gpus_per_node % t == 0)]


def fit_reasons(mem: StageMemory, hw: Hardware) -> list:
    """Why a trainer GPU is too full: the peak against max_mem_frac x the card, and its
    largest terms."""
    if mem.peak <= hw.cap_bytes:
        return []
    terms = {k: v for k, v in mem.terms.items() if not k.endswith("transient")}
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in top)
    return [f"trainer ({mem.stage} stage): {mem.peak / GB:.1f} GB > {hw.max_mem_frac:g} x "
            f"{hw.gpu_mem_gb:g} GB = {hw.cap_bytes / GB:.1f} GB (largest: {parts} GB)"]


def placement_reasons(hw: Hardware, colocated: bool) -> list:
    """Colocated servers run on every node, each node's ranks hosting gpus_per_node /
    server TP of them: beyond one node every node must be whole."""
    if colocated and hw.gpus > hw.gpus_per_node and hw.gpus % hw.gpus_per_node:
        return [f"config: colocated servers need whole nodes: {hw.gpus} GPUs are not a "
                f"multiple of {hw.gpus_per_node} per node"]
    return []


def memory_options(m: ModelShape, run: RunShape, lay: Layout, a: Assumptions,
                   colocated: bool, split: Optional[list] = None) -> dict:
    """Peak GB of the layout's fullest GPU with and without the distributed optimizer and
    full recomputation (the plan's layer split)."""
    out = {}
    for dist_opt in (True, False):
        for rc in (False, True):
            key = ("distopt" if dist_opt else "no_distopt") + ("_recompute" if rc else "")
            mem = trainer_memory(m, run, replace(lay, distributed_optimizer=dist_opt,
                                                 recompute=rc), a, colocated, split)
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
                       math.inf, f"sglang: no server TP divides {gpus} GPUs and {m.heads} "
                       f"heads within a node of {hw.gpus_per_node}")


def evaluate(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions, tp: int, pp: int,
             dp: int, rollout_gpus: int, colocated: bool) -> Plan:
    """One layout + rollout split: memory (no recompute if it fits within max_mem_frac,
    else full recompute; uneven stages balanced by memory), the best server TP (colocated:
    with what the trainer keeps during generation under ``a.offload``), step time and
    tokens/s, and the trainer's own validation of the config the plan stands for."""
    sp = a.spec == "te" and tp > 1
    lay = Layout(tp=tp, pp=pp, dp=dp, sequence_parallel=sp)
    mem = trainer_memory(m, run, lay, a, colocated)
    if mem.peak > hw.cap_bytes:
        lay = replace(lay, recompute=True)
        mem = trainer_memory(m, run, lay, a, colocated)
    why = fit_reasons(mem, hw) + placement_reasons(hw, colocated)
    offload = a.offload if colocated else "none"
    resident = mem.rollout_resident[offload] if colocated else 0
    rollout = best_rollout(m, run, hw, a, hw.gpus if colocated else rollout_gpus, resident,
                           colocated)
    if not rollout.fits:
        why.append(rollout.why)
    sync_mode = "tensor" if colocated else a.weight_sync
    times = {"rollout_s": rollout.seconds,
             "reward_s": run.prompts_per_step * run.n_samples * a.reward_s_per_sample,
             "train_s": trainer_seconds(m, run, lay, hw, a),
             "sync_s": (sync_seconds(m, sync_mode, rollout.servers, rollout.server_tp, lay,
                                     hw, a) if rollout.servers else math.inf),
             "offload_s": offload_seconds(mem.offload_bytes[offload], hw)}
    total = step_seconds(times, overlapped=run.overlap and not colocated)
    times["step_s"] = total
    config = plan_config(lay, mem.split, rollout.mode, rollout.servers, rollout.server_tp,
                         rollout.mem_fraction, run, a)
    if rollout.servers and not any(w.startswith("config:") for w in why):
        problem = config_problem(config, lay.gpus, hf_shape(m))
        if problem:
            why.append(f"config: the trainer refuses it: {problem}")
    gain = (mem.rollout_resident["none"] - resident) / GB if colocated else 0.0
    return Plan(layout=lay, rollout=rollout, trainer_gpus=lay.gpus, memory=mem,
                fits=not why, why=why, times=times, pp_split=mem.split,
                options=memory_options(m, run, lay, a, colocated, mem.split),
                tokens_per_s=run.tokens / total if math.isfinite(total) else 0.0,
                offload=offload, kv_gain_gb=round(gain, 1), config=config)


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
