"""Weight-sync throughput: Megatron (TP2 on two local ranks) -> SGLang servers, per mode
and bucket size, and the ``distributed`` mode's cost of a second server. Prints one JSON
object.

    python benchmarks/weight_sync.py                       # ~100M parameters, fp32, CPU/gloo
    python benchmarks/weight_sync.py --hidden 256 --layers 2 --vocab 4096 --buckets 4 16
    python benchmarks/weight_sync.py --servers 1 2 --modes distributed --buckets 64

Each (mode, bucket) pair is synced ``--repeats`` times after a warm-up sync; the median
wall time (pause -> verified version) is reported with GB/s (bytes of the HF tensors sent
to each server) and the speed-up over the disk mode at the same bucket size.

With ``--servers 1 2`` the ``distributed`` mode also runs with each server count in two
fan-outs: ``per_server`` (one group per server, broadcast in turn: the layout before) and
``shared`` (one group per PP stage spanning every server: one broadcast reaches all);
``fan_out`` in the JSON gives each one's time with 2 servers over its time with 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time


def _rank(args: dict, model_dir: str, work_dir: str) -> dict:
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
    cfg = RolloutConfig(startup_timeout_s=600, request_timeout_s=600,
                        num_servers=max(args["servers"]))
    engine = RolloutEngine.launch(cfg, model_path=model_dir, layout=layout, hf_config=hf,
                                  work_dir=work_dir)
    rows, fan_rows = [], []
    try:
        for n_servers in (args["servers"] if len(args["servers"]) > 1 else []):
            for fan in ("per_server", "shared"):
                eng = RolloutEngine(engine.servers[:n_servers], mode="distributed",
                                    layout=layout, hf_config=hf, work_dir=work_dir,
                                    bucket_mb=args["buckets"][-1])
                eng.transport.per_server = fan == "per_server"
                sec, stats = _timed_syncs(eng, model, f"{fan}-{n_servers}", args["repeats"])
                fan_rows.append(dict(servers=n_servers, fan_out=fan, seconds=round(sec, 4),
                                     transfer_seconds=round(stats.transfer_seconds, 4),
                                     bytes_per_server=stats.bytes))
        for bucket_mb in args["buckets"]:
            for mode in args["modes"]:
                eng = RolloutEngine(engine.servers, mode=mode, layout=layout, hf_config=hf,
                                    bucket_mb=bucket_mb, work_dir=work_dir)
                sec, stats = _timed_syncs(eng, model, f"{mode}-{bucket_mb}", args["repeats"])
                rows.append(dict(mode=mode, bucket_mb=bucket_mb, seconds=round(sec, 4),
                                 transfer_seconds=round(stats.transfer_seconds, 4),
                                 gb_per_s=round(stats.bytes / sec / 1e9, 4),
                                 buckets=stats.buckets, bytes=stats.bytes))
    finally:
        engine.shutdown()
    tp_params = [None] * dist.get_world_size()
    dist.all_gather_object(tp_params, n_params)
    return dict(rows=rows, fan_rows=fan_rows, megatron_params_per_rank=tp_params)


def _timed_syncs(eng, model, tag: str, repeats: int):
    """Median seconds of ``repeats`` syncs after a warm-up one (which creates the groups),
    and the last sync's stats; closes the engine's transport."""
    import torch
    import torch.distributed as dist

    eng.sync_weights(model, version=f"warm-{tag}")
    times, transfers, stats = [], [], None
    for i in range(repeats):
        with torch.no_grad():  # new weights each time, as after an optimizer step
            for p in model.parameters():
                p.mul_(1.0001)
        dist.barrier()
        stats = eng.sync_weights(model, version=f"{tag}-{i}")
        times.append(stats.seconds)
        transfers.append(stats.transfer_seconds)
    eng.transport.close()
    # the medians of the whole sync and of its transfer part; the last sync's byte counts
    return statistics.median(times), dataclasses.replace(
        stats, transfer_seconds=statistics.median(transfers))


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
    ap.add_argument("--servers", type=int, nargs="+", default=[1],
                    help="server counts for the distributed fan-out comparison (e.g. 1 2)")
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
    if res["fan_rows"]:
        sec = {(r["fan_out"], r["servers"]): r["seconds"] for r in res["fan_rows"]}
        lo, hi = min(args.servers), max(args.servers)
        out["fan_out"] = dict(
            rows=res["fan_rows"], servers=[lo, hi], bucket_mb=args.buckets[-1],
            # time with the most servers over time with the fewest: 1.0 = a server costs nothing
            ratio_per_server=round(sec[("per_server", hi)] / sec[("per_server", lo)], 3),
            ratio_shared=round(sec[("shared", hi)] / sec[("shared", lo)], 3),
            shared_over_per_server=round(sec[("shared", hi)] / sec[("per_server", hi)], 3))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
