"""The per-size recipes in examples/configs/recipes/: each loads and validates for its model
and GPU count, and is what tools/make_recipes.py writes from the planner's top plan today."""
from __future__ import annotations

import difflib
import os

import pytest

from srft_mcore.planning.model_shape import PRESETS
from srft_mcore.config import load_config, validate
from tools import make_recipes as mr

SPECS = {s.preset: s for s in mr.RECIPES}


def test_one_recipe_per_preset_and_no_strays():
    assert sorted(SPECS) == sorted(PRESETS)
    shipped = sorted(f[:-len(".yaml")] for f in os.listdir(mr.OUT_DIR) if f.endswith(".yaml"))
    assert shipped == sorted(SPECS)


@pytest.mark.parametrize("preset", sorted(SPECS))
def test_recipe_loads_validates_and_matches_the_planner(preset):
    spec = SPECS[preset]
    path = mr.recipe_path(spec)
    plan, _ = mr.top_plan(spec)
    cfg = load_config(path)
    lay, r = plan.layout, plan.rollout
    # the checks of a real launch: world size = the trainer's GPUs, heads / layers of the model
    validate(cfg, world_size=plan.trainer_gpus, hf_config=PRESETS[preset])
    got = dict(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=cfg.parallel.dp,
               split=cfg.parallel.pp_layer_split, sp=cfg.parallel.sequence_parallel,
               dist_opt=cfg.parallel.use_distributed_optimizer,
               recompute=cfg.model.recompute_granularity, servers=cfg.rollout.num_servers,
               server_tp=cfg.rollout.server_tp, sync=cfg.rollout.weight_sync,
               micro=cfg.train.micro_batch_size, mini=cfg.train.mini_batches,
               mem_fraction=cfg.rollout.mem_fraction,
               packing=cfg.train.max_tokens_per_micro_batch)
    want = dict(tp=lay.tp, pp=lay.pp, dp=lay.dp, split=plan.pp_split, sp=lay.sequence_parallel,
                dist_opt=lay.distributed_optimizer, recompute="full" if lay.recompute else None,
                servers=r.servers, server_tp=r.server_tp,
                sync="tensor" if r.mode == "colocated" else "distributed",
                micro=mr.RUN.micro_batch, mini=mr.RUN.mini_batches,
                mem_fraction=r.mem_fraction, packing=mr.RUN.max_tokens_per_micro_batch)
    assert got == want, "the planner picks another layout now: run python tools/make_recipes.py"
    if spec.multi_node:  # whole nodes; every server inside one node
        assert plan.trainer_gpus % spec.gpus_per_node == 0
        assert spec.gpus_per_node % r.server_tp == 0
    text = open(path).read()
    fresh = mr.recipe_text(spec)
    diff = "".join(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True),
                                        "shipped", "regenerated"))
    assert text == fresh, f"{path} is out of date (python tools/make_recipes.py):\n{diff}"


def test_check_mode_reports_a_stale_recipe(tmp_path, capsys):
    assert mr.main(["--out", str(tmp_path)]) == 0
    assert mr.main(["--check", "--out", str(tmp_path)]) == 0
    stale = mr.recipe_path(mr.RECIPES[0], str(tmp_path))
    with open(stale, "a") as f:
        f.write("# edited by hand\n")
    assert mr.main(["--check", "--out", str(tmp_path)]) == 1
    assert stale in capsys.readouterr().err
