"""``srft-plan``: which TP/PP/DP layouts and trainer/rollout GPU splits fit a model, and
how fast.

    srft-plan --model qwen2.5-7b --gpus 8 --gpu-mem 80
    srft-plan --model path/to/config.json --gpus 64 --gpu-mem 80 --response-len 8192 --json
    srft-plan --model qwen2.5-72b --gpus 64 --gpu-mem 80 --max-tokens-per-micro-batch 18432

Everything is arithmetic on the model's HF config and the run's shape; nothing is built or
launched (and torch is not imported).
"""
from __future__ import annotations

import argparse
import json
import sys

from srft_mcore.planning.model_shape import PRESETS, PlanError, load_model
from srft_mcore.planning.report import build_report, format_table
from srft_mcore.planning.run_shape import DTYPE_BYTES, Assumptions, Hardware, RunShape


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="srft-plan", description="Which TP/PP/DP layouts and rollout GPU splits fit a "
        "model for SRFT, ranked by estimated throughput (arithmetic only, nothing runs).")
    ap.add_argument("--model", required=True,
                    help=f"a preset ({', '.join(PRESETS)}) or a config.json / HF model dir")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all (trainer + rollout)")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GB")
    ap.add_argument("--gpus-per-node", type=int, default=8,
                    help="GPUs per node: beyond one node, SGLang servers (colocated or "
                    "dedicated) stay inside a node, so their TP divides this")
    ap.add_argument("--max-mem-frac", type=float, default=0.9,
                    help="headroom: a plan fits only when every GPU's peak (trainer, and the "
                    "SGLang side) is <= this x --gpu-mem (default 0.9)")
    ap.add_argument("--prompts-per-step", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--response-len", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--max-tokens-per-micro-batch", type=int, default=None,
                    help="train.max_tokens_per_micro_batch: pack sequences into rows of this "
                    "many tokens (activations and logits scale with it; >= prompt + "
                    "response); default: --micro-batch padded sequences")
    ap.add_argument("--no-demos", action="store_true",
                    help="rollouts only (GRPO): no demonstration per prompt")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--rollout-gpus", type=int, help="dedicated SGLang GPUs (fixed)")
    where.add_argument("--colocated", action="store_true",
                       help="SGLang shares the trainer's GPUs (released during training)")
    ap.add_argument("--overlap", action="store_true",
                    help="rollout.overlap: dedicated rollouts of the next step run during "
                    "training (colocated plans stay sequential)")
    ap.add_argument("--offload", default="state", choices=("none", "state", "all"),
                    help="rollout.offload of colocated plans: what the trainer moves to "
                    "pinned host memory during generation (none; state: gradients + "
                    "optimizer, the default; all: + weights). More KV room, host copies "
                    "per step")
    ap.add_argument("--host-bw-gbs", type=float, default=25.0,
                    help="host <-> GPU copy bandwidth per GPU and direction in GB/s (the "
                    "offload's time)")
    ap.add_argument("--weight-sync", default="distributed", choices=("distributed", "disk"),
                    help="rollout.weight_sync of dedicated plans (colocated ones use tensor)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    ap.add_argument("--spec", default="te", choices=("te", "local"))
    ap.add_argument("--sglang-mem-fraction", type=float, default=None,
                    help="SGLang --mem-fraction-static (rollout.mem_fraction) for every plan "
                    "(default: chosen per plan, enough KV for its servers within "
                    "--max-mem-frac)")
    ap.add_argument("--overhead-gib", type=float, default=4.0)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--hbm-gbps", type=float, default=3000.0)
    ap.add_argument("--top", type=int, default=10, help="fitting plans to list")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def check_args(args) -> None:
    """Input checks with the fix in the message."""
    positive = {"--gpus": args.gpus, "--gpu-mem": args.gpu_mem, "--prompts-per-step":
                args.prompts_per_step, "--n-samples": args.n_samples, "--prompt-len":
                args.prompt_len, "--response-len": args.response_len, "--micro-batch":
                args.micro_batch, "--mini-batches": args.mini_batches,
                "--gpus-per-node": args.gpus_per_node}
    for flag, value in positive.items():
        if value <= 0:
            raise PlanError(f"{flag}={value} must be positive. Fix: pass a value > 0")
    if args.prompts_per_step % args.mini_batches:
        raise PlanError(f"--mini-batches={args.mini_batches} does not divide "
                        f"--prompts-per-step={args.prompts_per_step}. Fix: choose a divisor")
    if args.rollout_gpus is not None and not 0 < args.rollout_gpus < args.gpus:
        raise PlanError(f"--rollout-gpus={args.rollout_gpus} must leave the trainer GPUs out of "
                        f"--gpus={args.gpus}. Fix: 1 <= --rollout-gpus < --gpus, or --colocated")
    if not 0 < args.max_mem_frac <= 1:
        raise PlanError(f"--max-mem-frac={args.max_mem_frac} must be in (0, 1]. Fix: e.g. "
                        f"0.9 (10 % of each GPU left as headroom)")
    if args.host_bw_gbs <= 0:
        raise PlanError(f"--host-bw-gbs={args.host_bw_gbs} must be positive. Fix: e.g. 25 "
                        f"(PCIe)")
    budget, seq = args.max_tokens_per_micro_batch, args.prompt_len + args.response_len
    if budget is not None and budget < seq:
        raise PlanError(f"--max-tokens-per-micro-batch={budget} is below the longest sequence "
                        f"(--prompt-len + --response-len = {seq}). Fix: pass >= {seq} (a few "
                        f"times it packs well), or leave it unset to pad")
    if args.sglang_mem_fraction is not None and not 0 < args.sglang_mem_fraction < 1:
        raise PlanError(f"--sglang-mem-fraction={args.sglang_mem_fraction} must be in (0, 1). "
                        f"Fix: e.g. 0.6")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        model = load_model(args.model)
    except PlanError as e:
        print(f"srft-plan: {e}", file=sys.stderr)
        return 2
    run = RunShape(prompts_per_step=args.prompts_per_step, n_samples=args.n_samples,
                   prompt_len=args.prompt_len, response_len=args.response_len,
                   micro_batch=args.micro_batch, mini_batches=args.mini_batches,
                   with_demos=not args.no_demos, overlap=args.overlap,
                   max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    hw = Hardware(gpus=args.gpus, gpu_mem_gb=args.gpu_mem, gpus_per_node=args.gpus_per_node,
                  peak_tflops=args.peak_tflops, hbm_gbps=args.hbm_gbps,
                  host_bw_gbs=args.host_bw_gbs, max_mem_frac=args.max_mem_frac)
    a = Assumptions(dtype=args.dtype, spec=args.spec, overhead_gib=args.overhead_gib,
                    sglang_mem_fraction=args.sglang_mem_fraction, offload=args.offload,
                    weight_sync=args.weight_sync)
    report = build_report(model, run, hw, a, args.rollout_gpus,
                          True if args.colocated else None, top=args.top)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
