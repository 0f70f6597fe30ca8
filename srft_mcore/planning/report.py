"""srft-plan's output: the search's plans as one JSON-ready report, and that report as a
Markdown table with why each TP size does or does not fit.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Optional

from srft_mcore.planning.layout_search import Plan, search, tp_summary
from srft_mcore.planning.model_shape import ModelShape, hf_param_count
from srft_mcore.planning.rollout_estimate import kv_bytes_per_token
from srft_mcore.planning.run_shape import GB, Assumptions, Hardware, RunShape


def plan_to_dict(p: Plan) -> dict:
    r = p.rollout
    return {
        "tp": p.layout.tp, "pp": p.layout.pp, "dp": p.layout.dp, "trainer_gpus": p.trainer_gpus,
        "pp_layer_split": p.pp_split,
        "recompute": "full" if p.layout.recompute else None,
        "sequence_parallel": p.layout.sequence_parallel,
        "distributed_optimizer": p.layout.distributed_optimizer,
        "rollout": {"mode": r.mode, "gpus": r.gpus, "servers": r.servers,
                    "server_tp": r.server_tp, "kv_gb_per_gpu": r.kv_gb_per_gpu,
                    "concurrent_seqs_per_server": r.concurrent_seqs},
        "fits": p.fits, "why_not": p.why,
        "memory_gb": {"peak": round(p.memory.peak / GB, 2), "stage": p.memory.stage,
                      **{k: round(v / GB, 2) for k, v in p.memory.terms.items()},
                      "options": p.options},
        "time_s": {k: round(v, 1) if math.isfinite(v) else None for k, v in p.times.items()},
        "tokens_per_s": round(p.tokens_per_s),
    }


def build_report(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
                 rollout_gpus: Optional[int] = None, colocated: Optional[bool] = None,
                 top: int = 10) -> dict:
    plans = search(m, run, hw, a, rollout_gpus, colocated)
    fitting = [p for p in plans if p.fits]
    report = {
        "model": {"name": m.name, **asdict(m), "params": hf_param_count(m),
                  "kv_bytes_per_token": kv_bytes_per_token(m)},
        "run": {**asdict(run), "sequences_per_step": run.sequences,
                "tokens_per_step": run.tokens},
        "hardware": asdict(hw), "assumptions": asdict(a),
        "layouts": [plan_to_dict(p) for p in fitting[:top]],
        "fitting_count": len(fitting),
        "not_fitting": [plan_to_dict(p) for p in plans if not p.fits][:top],
        "tp_summary": tp_summary(plans, m),
    }
    return report


def format_table(report: dict) -> str:
    """The ranked fitting plans as a Markdown table, then why each TP does or does not fit."""
    m, hw = report["model"], report["hardware"]
    lines = [f"{m['name']}: {m['params'] / 1e9:.2f}B params on {hw['gpus']} x "
             f"{hw['gpu_mem_gb']:g} GB; step = {report['run']['sequences_per_step']} sequences "
             f"x {report['run']['prompt_len'] + report['run']['response_len']} tokens", "",
             "| # | TP | PP | DP | recompute | trainer peak GB | rollout | KV GB/GPU | seqs/server "
             "| rollout s | train s | step s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(report["layouts"], 1):
        r, t = p["rollout"], p["time_s"]
        where = "colocated" if r["mode"] == "colocated" else f"{r['gpus']} GPUs"
        lines.append(f"| {i} | {p['tp']} | {p['pp']} | {p['dp']} | {p['recompute'] or '-'} | "
                     f"{p['memory_gb']['peak']:.1f} | {where}, {r['servers']} x TP"
                     f"{r['server_tp']} | {r['kv_gb_per_gpu']:.1f} | "
                     f"{r['concurrent_seqs_per_server']} | {t['rollout_s']:.0f} | "
                     f"{t['train_s']:.0f} | {t['step_s']:.0f} | {p['tokens_per_s']:,} |")
    if not report["layouts"]:
        lines.append("| - | no layout fits | | | | | | | | | | | |")
    lines.append("")
    for tp, info in report["tp_summary"].items():
        lines += _summary_lines(tp, info)
        if not info["fits"] or info["best"]["plan"].split(" |")[0].split()[1] != "PP1":
            lines += _summary_lines(f"{tp} PP1", info["pp1"])
    return "\n".join(lines)


def _summary_lines(name: str, info: dict) -> list:
    if info["fits"]:
        b = info["best"]
        return [f"{name}: fits, best {b['plan']} ({b['tokens_per_s']:,} tokens/s)"]
    out = []
    for mode, sub in info.get("why_not", {}).items():
        if sub is None:
            out.append(f"{name} {mode}: no layout (GPU count, or batch not divisible by DP)")
        else:
            out.append(f"{name} {mode}: does not fit, e.g. {sub['plan']}: " + "; ".join(sub["why"]))
    return out or [f"{name}: no layout (GPU count, or batch not divisible by DP)"]
