"""``srft-doctor``: check an installation the way a user would before a long run.

Subcommands (each prints readable lines, then one JSON object as its last line; the exit
code is non-zero when the check fails):

  srft-doctor env                          versions, devices, optional GPU components
  srft-doctor config --config F [k=v ...]  validate a run config (+ --world-size N)
  srft-doctor parallel --tp 2 --pp 2       TP/PP/DP ranks on a tiny model vs one rank
  srft-doctor sglang                       start SGLang on a tiny model, /generate n=2, stop
  srft-doctor parity --hf DIR --tp 2 --pp 2  Megatron (HF weights via the bridge) vs transformers logits
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import sys
import tempfile
import time


def _print_json(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def _version(pkg: str):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def cmd_env(args) -> int:
    import torch

    info = {
        "check": "env",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_count": os.cpu_count(),
    }
    for pkg in ("megatron-core", "sglang", "transformers", "datasets", "math-verify",
                "safetensors", "transformer-engine", "apex", "srft_mcore"):
        info[pkg] = _version(pkg)
    for key, value in info.items():
        print(f"  {key:18s} {value}")
    ok = info["megatron-core"] is not None
    info["ok"] = ok
    _print_json(info)
    return 0 if ok else 1


def cmd_config(args) -> int:
    from srft_mcore.config import ConfigError, load_config, validate
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models.tiny import tiny_hf_config

    try:
        cfg = load_config(args.config, args.overrides)
        hf = load_hf_config(cfg.model.hf_path) if cfg.model.hf_path else \
            tiny_hf_config().to_dict()
        validate(cfg, world_size=args.world_size, hf_config=hf)
    except (ConfigError, FileNotFoundError) as e:
        print(str(e), file=sys.stderr)
        _print_json({"check": "config", "ok": False, "error": str(e)})
        return 2
    print(f"  config OK: tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.parallel.dp} "
          f"algorithm={cfg.algorithm.name}")
    _print_json({"check": "config", "ok": True, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                 "dp": cfg.parallel.dp})
    return 0


def cmd_parallel(args) -> int:
    from srft_mcore.config import (Config, ConfigError, DataConfig, ParallelConfig, TrainConfig,
                                   validate)
    from srft_mcore.doctor.parallel_check import TINY_QWEN2, check_layout

    world = args.tp * args.pp * args.dp
    try:  # the same checks a training run gets, before any rank is started
        validate(Config(parallel=ParallelConfig(tp=args.tp, pp=args.pp, dp=args.dp),
                        train=TrainConfig(prompts_per_step=args.dp, micro_batch_size=1),
                        data=DataConfig(max_prompt_len=8, max_response_len=8)),  # 16 tokens
                 world_size=world, hf_config=TINY_QWEN2)
        if args.global_batch % (args.dp * args.micro_batch):
            raise ConfigError(f"config error: --global-batch={args.global_batch}: not divisible "
                              f"by dp*micro_batch={args.dp * args.micro_batch}. Fix: use a multiple")
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        _print_json({"check": "parallel", "ok": False, "error": str(e)})
        return 2
    print(f"  launching {world} rank(s): tp={args.tp} pp={args.pp} dp={args.dp} "
          f"(+ 1 reference rank), tiny Qwen2 (GQA, qkv bias{', tied embeddings' * args.tied}), "
          f"{args.dtype}")
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="srft-doctor-") as work:
        res = check_layout(args.tp, args.pp, args.dp, work,
                           distributed_optimizer=args.distributed_optimizer,
                           global_batch=args.global_batch, micro_batch=args.micro_batch,
                           dtype=args.dtype, tied=args.tied)
    res["check"] = "parallel"
    res["seconds"] = round(time.time() - t0, 2)
    tied = (f", tied copies differ by {res['tied_weight_diff']:.3e}"
            if "tied_weight_diff" in res else "")
    print(f"  loss {res['loss']:.6f} (one rank {res['reference_loss']:.6f}), max grad diff "
          f"{res['max_grad_diff']}, max updated-weight diff {res['max_param_diff']:.3e}{tied}; "
          f"tolerance ({args.dtype}): {res['tolerance']}")
    _print_json(res)
    return 0 if res["ok"] else 1


def cmd_sglang(args) -> int:
    from srft_mcore.models.tiny import make_tiny_hf_model
    from srft_mcore.rollout.client import SamplingParams, SGLangClient
    from srft_mcore.rollout.server import SGLangServer

    result = {"check": "sglang", "ok": False}
    with tempfile.TemporaryDirectory(prefix="srft-doctor-sglang-") as work:
        model_dir = make_tiny_hf_model(os.path.join(work, "tiny-qwen2"), arch="qwen2")
        t0 = time.time()
        server = SGLangServer.launch(model_dir, log_path=os.path.join(work, "server.log"),
                                     startup_timeout_s=args.timeout)
        try:
            result["startup_s"] = round(time.time() - t0, 2)
            print(f"  server ready at {server.url} (pid {server.pid}) in {result['startup_s']}s")
            t1 = time.time()
            outs = SGLangClient([server.url]).generate(
                ["1 + 2 ="], n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=8))
            result["generate_s"] = round(time.time() - t1, 3)
            samples = outs[0]
            result["n_samples"] = len(samples)
            result["tokens"] = [len(s.token_ids) for s in samples]
            result["logprobs_finite"] = all(
                len(s.logprobs) == len(s.token_ids) and all(lp <= 0.0 for lp in s.logprobs)
                for s in samples)
            for s in samples:
                print(f"  sample: {s.text!r} ({len(s.token_ids)} tokens, {s.finish_reason})")
        finally:
            pid = server.pid
            server.stop()
        result["stopped"] = not _pid_alive(pid)
        result["ok"] = bool(result["n_samples"] == 2 and result["logprobs_finite"]
                            and result["stopped"])
    _print_json(result)
    return 0 if result["ok"] else 1


def cmd_parity(args) -> int:
    from srft_mcore.config import ConfigError
    from srft_mcore.doctor.parity import parity_check
    from srft_mcore.models.name_map import BridgeError
    from srft_mcore.models.registry import UnsupportedArchitecture

    try:  # bad input: one paragraph and exit 2, before any rank starts
        res = parity_check(args.hf, tp=args.tp, pp=args.pp, batch=args.batch,
                           seq_len=args.seq_len)
    except (ConfigError, BridgeError, UnsupportedArchitecture, FileNotFoundError) as e:
        print(f"srft-doctor parity: {e}", file=sys.stderr, flush=True)
        print(json.dumps({"check": "parity", "ok": False, "error": str(e)}), flush=True)
        return 2
    res["tol"] = args.tol
    res["ok"] = res["max_abs_diff"] <= args.tol
    print(json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srft-doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions and devices").set_defaults(fn=cmd_env)

    c = sub.add_parser("config", help="validate a run config without launching anything")
    c.add_argument("--config", help="YAML config file")
    c.add_argument("--world-size", type=int, default=None, help="ranks the run will have")
    c.add_argument("overrides", nargs="*", help="a.b.c=value overrides")
    c.set_defaults(fn=cmd_config)

    par = sub.add_parser("parallel", help="TP/PP/DP ranks on a tiny model vs one rank")
    par.add_argument("--tp", type=int, default=2)
    par.add_argument("--pp", type=int, default=1)
    par.add_argument("--dp", type=int, default=1)
    par.add_argument("--distributed-optimizer", action="store_true",
                     help="shard the optimizer over DP (compares updated weights)")
    par.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    par.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    par.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="bfloat16: bf16 params + fp32 master weights, bf16 tolerances")
    par.add_argument("--tied", action="store_true",
                     help="tied word embeddings (with --pp 2: the stages' copies stay equal)")
    par.set_defaults(fn=cmd_parallel)

    s = sub.add_parser("sglang", help="start SGLang on a tiny model, generate n=2, stop it")
    s.add_argument("--timeout", type=float, default=300.0, help="start-up timeout (s)")
    s.set_defaults(fn=cmd_sglang)

    q = sub.add_parser(
        "parity", help="logits of the Megatron model loaded from a HF checkpoint vs transformers")
    q.add_argument("--hf", required=True, help="HF model directory (config.json, safetensors)")
    q.add_argument("--tp", type=int, default=1)
    q.add_argument("--pp", type=int, default=1)
    q.add_argument("--seq-len", type=int, default=16)
    q.add_argument("--batch", type=int, default=2)
    q.add_argument("--tol", type=float, default=1e-4,
                   help="fail (exit 1) when the max abs logit difference exceeds this")
    q.set_defaults(fn=cmd_parity)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
