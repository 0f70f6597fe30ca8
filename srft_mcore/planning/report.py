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
        "max_tokens_per_micro_batch": p.config.get("train.max_tokens_per_micro_batch"),
        "rollout": {"mode": r.mode, "gpus": r.gpus, "servers": r.servers,
                    "server_tp": r.server_tp,
                    "servers_per_node": r.servers_per_node,
                    "weight_sync": p.config.get("rollout.weight_sync"),
                    "mem_fraction": r.mem_fraction, "peak_gb": r.peak_gb,
                    "offload": p.offload, "trainer_resident_gb": r.trainer_resident_gb,
                    "kv_gb_per_gpu": r.kv_gb_per_gpu, "offload_kv_gain_gb": p.kv_gain_gb,
                    "concurrent_seqs_per_server": r.concurrent_seqs},
        "fits": p.fits, "why_not": p.why,
        "memory_gb": {"peak": round(p.memory.peak / GB, 2), "stage": p.memory.stage,
                      "stage_peaks": [round(v / GB, 2) for v in p.memory.stage_peaks],
                      **{k: round(v / GB, 2) for k, v in p.memory.terms.items()},
                      "options": p.options},
        "config": p.config,
        "time_s": {k: round(v, 1) if math.isfinite(v) else None for k, v in p.times.items()},
        "tokens_per_s": round(p.tokens_per_s),
    }


def build_report(m: ModelShape, run: RunShape, hw: Hardware, a: Assumptions,
                 rollout_gpus: Optional[int] = None, colocated: Optional[bool] = None,
                 top: int = 10) -> dict:
    plans = search(m, run, hw, a, rollout_gpus, colocated)
    fitting = [p for p in plans if p.fits]
    report = {
        "max_mem_frac": hw.max_mem_frac,
        "limit_gb_per_gpu": round(hw.cap_bytes / GB, 2),
        "max_peak_gb_fitting": round(max((max(p.memory.peak / GB, p.rollout.peak_gb)
                                          for p in fitting), default=0.0), 2),
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
    run = report["run"]
    packing = (f", packed rows of {run['max_tokens_per_micro_batch']} tokens"
               if run.get("max_tokens_per_micro_batch") else "")
    lines = [f"{m['name']}: {m['params'] / 1e9:.2f}B params on {hw['gpus']} x "
             f"{hw['gpu_mem_gb']:g} GB ({hw['gpus_per_node']} per node); step = "
             f"{run['sequences_per_step']} sequences x "
             f"{run['prompt_len'] + run['response_len']} tokens{packing}; fits = every GPU "
             f"<= {report['max_mem_frac']:g} x {hw['gpu_mem_gb']:g} = "
             f"{report['limit_gb_per_gpu']:.1f} GB", "",
             "| # | TP | PP | DP | layer split | recompute | trainer peak GB | rollout "
             "| mem frac | SGLang peak GB | offload | KV GB/GPU (+offload) | seqs/server "
             "| rollout s | train s | sync s | offload s | step s | tokens/s |",
             "|" + "---|" * 19]
    for i, p in enumerate(report["layouts"], 1):
        r, t = p["rollout"], p["time_s"]
        where = "colocated" if r["mode"] == "colocated" else f"{r['gpus']} GPUs"
        split = "/".join(map(str, p["pp_layer_split"])) if p["pp_layer_split"] else "-"
        gain = f" (+{r['offload_kv_gain_gb']:.1f})" if r["offload_kv_gain_gb"] else ""
        lines.append(f"| {i} | {p['tp']} | {p['pp']} | {p['dp']} | {split} | "
                     f"{p['recompute'] or '-'} | {p['memory_gb']['peak']:.1f} | {where}, "
                     f"{r['servers']} x TP{r['server_tp']} | {r['mem_fraction']:.2f} | "
                     f"{r['peak_gb']:.1f} | {r['offload']} | {r['kv_gb_per_gpu']:.1f}{gain} | "
                     f"{r['concurrent_seqs_per_server']} | {t['rollout_s']:.0f} | "
                     f"{t['train_s']:.0f} | {t['sync_s']:.1f} | {t['offload_s']:.1f} | "
                     f"{t['step_s']:.0f} | {p['tokens_per_s']:,} |")
    if not report["layouts"]:
        lines.append("| - | no layout fits |" + " |" * 17)
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
