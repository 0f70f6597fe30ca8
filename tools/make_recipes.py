"""Write the per-size SRFT recipes in examples/configs/recipes/ from srft-plan's top plan.

    python tools/make_recipes.py            # (re)write every recipe
    python tools/make_recipes.py --check    # exit 1 and name the recipes that differ

Each recipe is the paper's run (section 5: 128 prompts per step, 8 rollouts at temperature
1.0, prompts <= 1024 and responses <= 8192 tokens, constant LR 1e-6, 2 mini-batches, 500
steps) with the layout the planner ranks first for that model on the GPUs listed in
:data:`RECIPES`: TP/PP/DP, uneven pipeline split, recomputation, sequence parallelism, the
distributed optimizer, the rollout placement (colocated or dedicated GPUs) and the SGLang
server count and TP, SGLang's memory fraction and the packing budget. The header comment
records the planner call, its estimate and the launch command. Which plans are runnable is
the planner's own check (``Plan.fits``: memory within its headroom, the layout, the server
placement, and the trainer's validation of the config), nothing here filters further:
colocated servers run on every node, so multi-node runs may be colocated too.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass

from srft_mcore.planning.layout_search import search
from srft_mcore.planning.plan_config import HAS_OFFLOAD
from srft_mcore.planning.model_shape import hf_param_count, load_model
from srft_mcore.planning.run_shape import Assumptions, GB, Hardware, RunShape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "examples", "configs", "recipes")


@dataclass(frozen=True)
class RecipeSpec:
    preset: str
    """srft-plan preset name (srft_mcore/planning/model_shape.py PRESETS)."""
    title: str
    """The model family and size as published."""
    gpus: int
    """GPUs in all, trainer + rollout."""
    gpu_mem_gb: float = 80.0
    gpus_per_node: int = 8
    note: str = ""
    """An extra header line about the checkpoint (context length, variants)."""

    @property
    def multi_node(self) -> bool:
        return self.gpus > self.gpus_per_node


_LLAMA_NOTE = ("Llama-3's 8192-token context is shorter than 1024 + 8192: use Llama-3.1 "
               "(128k) or shorten data.max_response_len")
RECIPES = (
    # one node of 8 x 80 GB up to 14B; 32B on 4 nodes, 70B/72B on 8 nodes
    RecipeSpec("qwen2.5-0.5b", "Qwen2.5-0.5B", 8),
    RecipeSpec("qwen2.5-1.5b", "Qwen2.5-1.5B", 8),
    RecipeSpec("qwen2.5-3b", "Qwen2.5-3B", 8),
    RecipeSpec("qwen2.5-7b", "Qwen2.5-7B", 8),
    RecipeSpec("qwen2.5-14b", "Qwen2.5-14B", 8),
    RecipeSpec("qwen2.5-32b", "Qwen2.5-32B", 32),
    RecipeSpec("qwen2.5-72b", "Qwen2.5-72B", 64),
    RecipeSpec("qwen3-0.6b", "Qwen3-0.6B", 8),
    RecipeSpec("qwen3-1.7b", "Qwen3-1.7B", 8),
    RecipeSpec("qwen3-4b", "Qwen3-4B", 8),
    RecipeSpec("qwen3-8b", "Qwen3-8B", 8),
    RecipeSpec("qwen3-14b", "Qwen3-14B", 8),
    RecipeSpec("qwen3-32b", "Qwen3-32B", 32),
    RecipeSpec("llama3-8b", "Llama-3-8B", 8, note=_LLAMA_NOTE),
    RecipeSpec("llama3-70b", "Llama-3-70B", 64, note=_LLAMA_NOTE),
)
RUN = RunShape()  # the paper's step: the planner's defaults
ASSUMPTIONS = Assumptions()
HEADROOM = Hardware(gpus=1, gpu_mem_gb=1.0).max_mem_frac  # the planner's default


def recipe_path(spec: RecipeSpec, out_dir: str = OUT_DIR) -> str:
    return os.path.join(out_dir, f"{spec.preset}.yaml")


def top_plan(spec: RecipeSpec) -> tuple:
    """(the planner's first fitting plan, how many fit) for ``spec``: the planner's
    ranking and runnable check, as ``srft-plan`` prints them."""
    model = load_model(spec.preset)
    hw = Hardware(gpus=spec.gpus, gpu_mem_gb=spec.gpu_mem_gb, gpus_per_node=spec.gpus_per_node)
    plans = [p for p in search(model, RUN, hw, ASSUMPTIONS) if p.fits]
    if not plans:
        raise SystemExit(f"make_recipes: no layout of {spec.preset} fits {spec.gpus} x "
                         f"{spec.gpu_mem_gb:g} GB (srft-plan --model {spec.preset} --gpus "
                         f"{spec.gpus} --gpu-mem {spec.gpu_mem_gb:g} says why)")
    return plans[0], len(plans)


def _comment(text: str) -> list[str]:
    """One paragraph as YAML comment lines of at most 92 characters."""
    return textwrap.wrap(text, width=92, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False)


def _yaml_list(values) -> str:
    """null, a number, or a flow list."""
    if values is None or isinstance(values, int):
        return "null" if values is None else str(values)
    return "[" + ", ".join(str(v) for v in values) + "]"


def _packing() -> str:
    budget = RUN.max_tokens_per_micro_batch
    return f" (packed rows of {budget} tokens)" if budget else " (padded, no packing)"


def _offload_time(t: dict) -> str:
    return f" + offload {t['offload_s']:.0f}" if t.get("offload_s") else ""


def _launch_lines(spec: RecipeSpec, plan, rel: str) -> list[str]:
    lay, r = plan.layout, plan.rollout
    args = f"--config {rel} model.hf_path=DIR data.path=FILE"
    if spec.multi_node:
        nodes = spec.gpus // spec.gpus_per_node
        if r.mode == "colocated":
            head = (f"# Launch ({nodes} nodes, each training and hosting its "
                    f"{r.servers_per_node} server(s) on its own GPUs):")
        else:
            head = (f"# Launch ({nodes} nodes: {plan.trainer_gpus // spec.gpus_per_node} "
                    f"train, {r.gpus // spec.gpus_per_node} serve rollouts, servers reached "
                    f"by URL):")
        return [head, f"#   CONFIG={rel} MODEL_DIR=DIR DATA_PATH=FILE \\",
                f"#   sbatch --nodes={nodes} examples/multinode/srft_slurm.sbatch"]
    if r.mode == "colocated":
        return ["# Launch (one node; srft-train checks the run, then starts torchrun):",
                f"#   srft-train --nproc-per-node {lay.gpus} \\",
                f"#     {args}"]
    gpus = ",".join(str(g) for g in range(plan.trainer_gpus, plan.trainer_gpus + r.gpus))
    return ["# Launch (one node; the servers on the GPUs after the trainer's):",
            f"#   SRFT_ROLLOUT_GPUS={gpus} srft-train --nproc-per-node {lay.gpus} \\",
            f"#     {args}"]


def recipe_text(spec: RecipeSpec) -> str:
    """The whole YAML file of ``spec``, header comment included."""
    plan, fitting = top_plan(spec)
    lay, r, t = plan.layout, plan.rollout, plan.times
    model = load_model(spec.preset)
    rel = os.path.relpath(recipe_path(spec), ROOT)
    colocated = r.mode == "colocated"
    per_node = f", {r.servers_per_node} per node" if spec.multi_node else ""
    placement = (f"{r.servers} SGLang server(s) x TP{r.server_tp} colocated on the trainer's "
                 f"GPUs{per_node} (weight_sync=tensor, rollout.offload {plan.offload}: "
                 f"+{plan.kv_gain_gb:.1f} GB of KV per GPU against none)" if colocated else
                 f"{r.servers} SGLang server(s) x TP{r.server_tp} on {r.gpus} GPUs of their own "
                 f"(weight_sync=distributed)")
    split = f", stages of {'/'.join(map(str, plan.pp_split))} layers" if plan.pp_split else ""
    flags = ", ".join(x for x in (
        "sequence parallel" if lay.sequence_parallel else "",
        "distributed optimizer" if lay.distributed_optimizer else "",
        "full recomputation" if lay.recompute else "no recomputation") if x)
    multi = f" ({spec.gpus_per_node} per node)" if spec.multi_node else ""
    planner_call = (f"srft-plan --model {spec.preset} --gpus {spec.gpus} --gpu-mem "
                    f"{spec.gpu_mem_gb:g}")
    lines = _comment(
        f"SRFT recipe: {spec.title} (srft-plan preset {spec.preset}, "
        f"{hf_param_count(model) / 1e9:.2f}B parameters). Written by tools/make_recipes.py "
        f"from srft-plan's top plan: edit the generator, not this file (python "
        f"tools/make_recipes.py; tests/test_recipes.py checks that the planner still agrees).")
    lines += _comment(
        f"Planned for {spec.gpus} GPUs of {spec.gpu_mem_gb:g} GB{multi}, every GPU within "
        f"{HEADROOM:g} of its memory, the paper's "
        f"step: {RUN.prompts_per_step} prompts x ({RUN.n_samples} rollouts + 1 "
        f"demonstration), {RUN.prompt_len} + {RUN.response_len} tokens, micro-batch "
        f"{RUN.micro_batch}{_packing()}, {RUN.mini_batches} mini-batches:")
    lines.append(f"#   {planner_call}")
    lines += _comment(
        f"Layout (plan 1 of the {fitting} that fit): trainer TP{lay.tp} PP{lay.pp} "
        f"DP{lay.dp} on {plan.trainer_gpus} GPUs{split}, {flags}; rollout: {placement}.")
    lines += _comment(
        f"Estimate: {plan.memory.peak / GB:.1f} GB peak per trainer GPU, SGLang "
        f"--mem-fraction-static {r.mem_fraction:g} ({r.peak_gb:.1f} GB peak per server GPU, "
        f"{r.kv_gb_per_gpu:.1f} GB of KV); step {t['step_s']:.0f} s (rollout "
        f"{t['rollout_s']:.0f} + reward {t['reward_s']:.0f} + train {t['train_s']:.0f} + "
        f"sync {t['sync_s']:.0f}{_offload_time(t)}), {plan.tokens_per_s:,.0f} "
        f"tokens/s (assumed MFU and bandwidths: read it as relative; README, Scaling).")
    lines += _launch_lines(spec, plan, rel)
    lines += _comment(
        "A checkpoint whose context is below 1024 + 8192 tokens (e.g. Qwen2.5-Math: 4096) "
        "needs model.rope_theta / model.max_position_embeddings, as in "
        "examples/configs/srft_qwen7b_tp2pp1.yaml." + (f" {spec.note}." if spec.note else ""))
    if colocated:
        servers = (f"{r.servers_per_node} per node, on the trainer's GPUs" if spec.multi_node
                   else "on the trainer's GPUs")
    else:
        servers = ("or rollout.urls: servers by URL" if spec.multi_node
                   else "launched by trainer rank 0")
    offload = f"\n  offload: {plan.offload}" if HAS_OFFLOAD else ""
    sp_note = "          # needs the transformer-engine spec" if lay.sequence_parallel else ""
    body = f"""model:
  hf_path: null                    # model.hf_path=DIR (Hugging Face {spec.title})
  dtype: bfloat16
  transformer_impl: auto           # transformer-engine spec when installed
  recompute_granularity: {"full" if lay.recompute else "null"}
parallel:
  tp: {lay.tp}
  pp: {lay.pp}
  dp: {lay.dp}                            # tp * pp * dp = {plan.trainer_gpus} trainer GPUs
  pp_layer_split: {_yaml_list(plan.pp_split)}
  sequence_parallel: {str(lay.sequence_parallel).lower()}{sp_note}
  use_distributed_optimizer: {str(lay.distributed_optimizer).lower()}
data:
  path: null                       # data.path=FILE (jsonl/parquet/arrow)
  prompt_key: prompt
  demo_key: demonstration
  answer_key: answer
  template: think
  max_prompt_len: {RUN.prompt_len}
  max_response_len: {RUN.response_len}
rollout:
  n_samples: {RUN.n_samples}
  temperature: 1.0
  top_p: 1.0
  num_servers: {r.servers}                   # {servers}
  server_tp: {r.server_tp}
  weight_sync: {"tensor" if colocated else "distributed"}
  mem_fraction: {r.mem_fraction:g}{offload}
  bucket_mb: 512
reward:
  fn: math
algorithm:
  name: srft
optimizer:
  lr: 1.0e-6
  lr_schedule: constant
  weight_decay: 0.0
  grad_clip: 1.0
train:
  steps: 500
  prompts_per_step: {RUN.prompts_per_step}
  mini_batches: {RUN.mini_batches}
  micro_batch_size: {RUN.micro_batch}
  max_tokens_per_micro_batch: {_yaml_list(RUN.max_tokens_per_micro_batch)}
  seed: 1234
checkpoint:
  every: 50
  keep: 3
  export_hf: true
logging:
  run_dir: runs/srft_{spec.preset}
  tensorboard: true
"""
    return "\n".join(lines) + "\n" + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a recipe differs from what would be written")
    ap.add_argument("--out", default=OUT_DIR, help="recipe directory")
    args = ap.parse_args(argv)
    stale = []
    os.makedirs(args.out, exist_ok=True)
    for spec in RECIPES:
        path = recipe_path(spec, args.out)
        text = recipe_text(spec)
        old = open(path).read() if os.path.isfile(path) else None
        if old == text:
            continue
        stale.append(path)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print("make_recipes: out of date (run python tools/make_recipes.py): "
              + " ".join(stale), file=sys.stderr)
        return 1
    print(f"make_recipes: {len(RECIPES)} recipes in {args.out}"
          + (f", {len(stale)} written" if stale and not args.check else ", up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
