"""srft-convert throughput and peak memory on a random ~1B-parameter Llama-shaped model.

Writes a random bf16 HF checkpoint, then times ``hf-to-mcore`` and ``mcore-to-hf`` (each a
subprocess whose process tree is sampled for RSS) next to reading and writing the same
bytes with safetensors alone. Prints one JSON object.

    python benchmarks/convert.py [--layers 20] [--tp 1] [--workdir DIR] [--keep]

``--tp`` is the tensor-parallel size of ``hf-to-mcore`` (one process per rank); the RSS
bound (2x the largest tensor + 1.5 GB) applies to each process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def config(layers: int) -> dict:
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
                hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-5,
                rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
                max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                attention_bias=False, mlp_bias=False, hidden_act="silu",
                bos_token_id=1, eos_token_id=2)


def write_random_hf(out: str, hf: dict) -> tuple[int, int, int]:
    from srft_mcore.models.name_map import expected_hf_shapes
    from tools.convert_ckpt.safetensors_out import StreamingSafetensorsWriter

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f)
    shapes = expected_hf_shapes(hf)
    w = StreamingSafetensorsWriter(out, [(n, s, torch.bfloat16) for n, s in shapes.items()],
                                   max_shard_bytes=2 * 1024**3)
    g = torch.Generator().manual_seed(0)
    numel = largest = 0
    for n, s in shapes.items():
        t = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        w.write(n, t)
        numel += t.numel()
        largest = max(largest, t.numel() * 2)
    w.close()
    return numel, numel * 2, largest


def run_measured(cmd: list) -> dict:
    """Run ``cmd``; sample the RSS of its whole process tree (sum) and of its largest process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree": 0, "proc": 0}
    done = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                peak["tree"] = max(peak["tree"], sum(rss))
                peak["proc"] = max(peak["proc"], max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    th.start()
    out, err = proc.communicate()
    seconds = time.time() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_tree_mb": round(peak["tree"] / 2**20),
            "peak_rss_process_mb": round(peak["proc"] / 2**20)}


def safetensors_baseline(src: str, dst: str) -> dict:
    code = f"""
import glob, os, time, json
from safetensors.torch import load_file, save_file
t0 = time.time(); parts = []
for f in sorted(glob.glob(os.path.join({src!r}, '*.safetensors'))):
    parts.append((os.path.basename(f), load_file(f)))
t1 = time.time()
os.makedirs({dst!r}, exist_ok=True)
for name, tensors in parts:
    save_file(tensors, os.path.join({dst!r}, name))
print(json.dumps({{'read_s': time.time() - t0 - (time.time() - t1), 'write_s': time.time() - t1}}))
"""
    res = run_measured([sys.executable, "-c", code])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--tp", type=int, default=1, help="hf-to-mcore tensor-parallel size")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="srft_convert_bench_")
    try:
        hf = config(args.layers)
        src = os.path.join(work, "hf")
        numel, nbytes, largest = write_random_hf(src, hf)
        cli = [sys.executable, "-m", "tools.convert_ckpt.cli"]
        to_mcore = run_measured(cli + ["hf-to-mcore", "--hf", src, "--out",
                                       os.path.join(work, "mcore"), "--tp", str(args.tp)])
        to_hf = run_measured(cli + ["mcore-to-hf", "--ckpt", os.path.join(work, "mcore"),
                                    "--out", os.path.join(work, "back")])
        base = safetensors_baseline(src, os.path.join(work, "plain"))
        bound_mb = round((2 * largest + 1.5 * 1024**3) / 2**20)
        gb = nbytes / 1024**3
        res = {
            "benchmark": "convert", "params": numel, "bytes": nbytes, "dtype": "bfloat16",
            "largest_tensor_mb": round(largest / 2**20), "rss_bound_mb": bound_mb,
            "cpu_count": os.cpu_count(), "hf_to_mcore_tp": args.tp,
            "hf_to_mcore": {**to_mcore, "gb_per_s": round(gb / to_mcore["seconds"], 3)},
            "mcore_to_hf": {**to_hf, "gb_per_s": round(gb / to_hf["seconds"], 3)},
            "safetensors_read_write": {**base, "gb_per_s": round(2 * gb / base["seconds"], 3)},
        }
        res["hf_to_mcore"]["time_ratio_vs_safetensors"] = round(
            to_mcore["seconds"] / base["seconds"], 2)
        res["mcore_to_hf"]["time_ratio_vs_safetensors"] = round(
            to_hf["seconds"] / base["seconds"], 2)
        for k in ("hf_to_mcore", "mcore_to_hf"):
            res[k]["under_rss_bound"] = res[k]["peak_rss_process_mb"] <= bound_mb
        print(json.dumps(res), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
