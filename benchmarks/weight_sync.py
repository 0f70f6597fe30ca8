"""Weight-sync throughput: Megatron (TP2 on two local ranks) -> one SGLang server, per mode
and bucket size. Prints one JSON object.

    python benchmarks/weight_sync.py                       # ~100M parameters, fp32, CPU/gloo
    python benchmarks/weight_sync.py --hidden 256 --layers 2 --vocab 4096 --buckets 4 16

Each (mode, bucket) pair is synced ``--repeats`` times after a warm-up sync; the median
wall time (pause -> verified version) is reported with GB/s (bytes of the HF tensors sent
to the server) and the speed-up over the disk mode at the same bucket size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _rank(args: dict, model_dir: str, work_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    from srft_mcore.config import ModelConfig, ParallelConfig, RolloutConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models.builder import build_model
    from srft_mcore.rollout.engine import RolloutEngine

    hf = load_hf_config(model_dir)
    layout = init_distributed(tp=args["tp"], pp=1, backend="gloo")
    model = build_model(hf, ModelConfig(), ParallelConfig(tp=args["tp"]))
    n_params = sum(p.numel() for p in model.parameters())
    cfg = RolloutConfig(startup_timeout_s=600, request_timeout_s=600)
    engine = RolloutEngine.launch(cfg, model_path=model_dir, layout=layout, hf_config=hf,
                                  work_dir=work_dir)
    rows = []
    try:
        for bucket_mb in args["buckets"]:
            for mode in args["modes"]:
                eng = RolloutEngine(engine.servers, mode=mode, layout=layout, hf_config=hf,
                                    bucket_mb=bucket_mb, work_dir=work_dir)
                eng.sync_weights(model, version=f"warm-{mode}-{bucket_mb}")
                times, stats = [], None
                for i in range(args["repeats"]):
                    with torch.no_grad():  # new weights each time, as after an optimizer step
                        for p in model.parameters():
                            p.mul_(1.0001)
                    dist.barrier()
                    stats = eng.sync_weights(model, version=f"{mode}-{bucket_mb}-{i}")
                    times.append(stats.seconds)
                eng.transport.close()
                sec = statistics.median(times)
                rows.append(dict(mode=mode, bucket_mb=bucket_mb, seconds=round(sec, 4),
                                 transfer_seconds=round(stats.transfer_seconds, 4),
                                 gb_per_s=round(stats.bytes / sec / 1e9, 4),
                                 buckets=stats.buckets, bytes=stats.bytes))
    finally:
        engine.shutdown()
    tp_params = [None] * dist.get_world_size()
    dist.all_gather_object(tp_params, n_params)
    return dict(rows=rows, megatron_params_per_rank=tp_params)


def _count_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), framework="pt") as h:
                for k in h.keys():
                    n = 1
                    for d in h.get_slice(k).get_shape():
                        n *= d
                    total += n
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--buckets", type=float, nargs="+", default=[16, 64, 256])
    ap.add_argument("--modes", nargs="+", default=["disk", "tensor", "distributed"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from srft_mcore.launching.local import spawn_ranks
    from srft_mcore.models.tiny import make_tiny_hf_model

    with tempfile.TemporaryDirectory(prefix="srft-bench-wsync-") as root:
        model_dir = make_tiny_hf_model(
            os.path.join(root, "model"), arch="qwen2", vocab_size=args.vocab,
            hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.kv_heads, intermediate_size=args.ffn)
        hf_params = _count_params(model_dir)
        t0 = time.time()
        res = spawn_ranks(_rank, args.tp, (vars(args), model_dir, os.path.join(root, "work")),
                          timeout_s=3600)[0]
    disk = {r["bucket_mb"]: r["seconds"] for r in res["rows"] if r["mode"] == "disk"}
    for r in res["rows"]:
        if r["bucket_mb"] in disk:
            r["speedup_vs_disk"] = round(disk[r["bucket_mb"]] / r["seconds"], 3)
    import torch

    out = dict(benchmark="weight_sync", device="cuda" if torch.cuda.is_available() else "cpu",
               cpus=os.cpu_count(), tp=args.tp, dtype="float32",
               hf_params=hf_params,
               model=dict(hidden=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab),
               repeats=args.repeats, results=res["rows"], wall_s=round(time.time() - t0, 1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
