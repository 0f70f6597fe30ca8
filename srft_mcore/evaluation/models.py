"""What ``srft-eval --model`` (or ``--url``) points at, and a HF directory SGLang can serve
from it: run directories unwrapped, Megatron checkpoints converted with the project's converter."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from srft_mcore.evaluation.errors import EvalError


@dataclass
class ModelSource:
    """What ``--model`` points at and where its config, tokenizer and run config live."""

    kind: str
    """hf | trainer | converted | url (attached servers)"""
    path: str
    hf_dir: str
    """config.json + tokenizer (for a HF directory: the directory itself)."""
    run_config: Optional[dict] = None
    run_config_path: Optional[str] = None


def read_run_config(path: Optional[str]) -> Optional[dict]:
    """The training run's config.yaml as a mapping (None without a path)."""
    import yaml

    if path is None:
        return None
    if not os.path.isfile(path):
        raise EvalError(f"--run-config {path}: no such file. Fix: give the run's config.yaml")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise EvalError(f"{path} is not valid YAML ({e}). Fix: give the run's config.yaml")
    if not isinstance(cfg, dict):
        raise EvalError(f"{path} is not a run config (a YAML mapping). Fix: give the run's "
                        f"config.yaml")
    return cfg


def config_section(cfg: Optional[dict], name: str) -> dict:
    """One section (``model``, ``data``, ...) of a run config; empty when absent."""
    return (cfg or {}).get(name) or {}


def _existing(path: str) -> Optional[str]:
    return path if os.path.isfile(path) else None


def _run_config_of(run_dir: str) -> Optional[str]:
    """``run_dir/config.yaml`` when run_dir is a training run's directory."""
    looks_like_run = any(os.path.exists(os.path.join(run_dir, n))
                         for n in ("metrics.jsonl", "checkpoints"))
    return _existing(os.path.join(run_dir, "config.yaml")) if looks_like_run else None


def _unwrap_run_dir(path: str) -> tuple[str, Optional[str]]:
    """A run directory -> its hf_final or latest checkpoint; a checkpoints root -> latest."""
    from srft_mcore.training.checkpoint import CheckpointError, latest_checkpoint

    run_cfg = _existing(os.path.join(path, "config.yaml"))
    try:
        if run_cfg and os.path.isfile(os.path.join(path, "hf_final", "config.json")):
            return os.path.join(path, "hf_final"), run_cfg
        if run_cfg and os.path.isdir(os.path.join(path, "checkpoints")):
            latest = latest_checkpoint(os.path.join(path, "checkpoints"))
            if latest:
                return latest, run_cfg
        if os.path.isfile(os.path.join(path, "latest")):
            latest = latest_checkpoint(path)
            return latest, _existing(os.path.join(path, os.pardir, "config.yaml"))
    except CheckpointError as e:
        raise EvalError(f"--model {path}: {e}") from None
    return path, None


def resolve_model(path: str, hf_config: Optional[str] = None,
                  run_config: Optional[str] = None) -> ModelSource:
    """Identify ``--model`` (HF directory, trainer checkpoint, converted checkpoint, run
    directory) and find its config/tokenizer directory and run config. Checks only files."""
    from tools.convert_ckpt.hf_to_mcore import BRIDGE_META, HF_SUBDIR

    if not os.path.isdir(path):
        raise EvalError(f"--model {path}: not a directory. Fix: give a HF model directory, a "
                        f"trainer checkpoint (RUN/checkpoints/step_XXXXXX) or an srft-convert "
                        f"hf-to-mcore output")
    path, found_cfg = _unwrap_run_dir(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "trainer_state.json")) and \
            os.path.isdir(os.path.join(path, "mcore")):
        kind = "trainer"
        found_cfg = found_cfg or _run_config_of(os.path.join(path, os.pardir, os.pardir))
    elif os.path.isfile(os.path.join(path, BRIDGE_META)):
        kind = "converted"
    elif os.path.isfile(os.path.join(path, "config.json")):
        kind = "hf"
        found_cfg = found_cfg or _run_config_of(os.path.join(path, os.pardir))
    else:
        raise EvalError(f"--model {path}: not a HF model directory (config.json), a trainer "
                        f"checkpoint (trainer_state.json + mcore/) or an srft-convert "
                        f"hf-to-mcore output ({BRIDGE_META}); it holds "
                        f"{sorted(os.listdir(path))[:20]}. Fix: point --model at one of those")
    cfg_path = os.path.abspath(run_config or found_cfg) if (run_config or found_cfg) else None
    cfg = read_run_config(cfg_path)
    hf_dir = hf_config or _default_hf_dir(kind, path, cfg, HF_SUBDIR)
    return ModelSource(kind=kind, path=path, hf_dir=os.path.abspath(hf_dir), run_config=cfg,
                       run_config_path=cfg_path)


def _default_hf_dir(kind: str, path: str, cfg: Optional[dict], hf_subdir: str) -> str:
    if kind == "hf":
        return path
    if kind == "converted":
        return os.path.join(path, hf_subdir)
    if cfg is None:
        raise EvalError(f"--model {path} is a trainer checkpoint, and no run config.yaml was "
                        f"found two levels up to name its base model. Fix: pass --hf-config "
                        f"DIR (the HF model the run started from) or --run-config "
                        f"RUN/config.yaml")
    from srft_mcore.models.tiny import EMBEDDED_MODEL_DIR

    return config_section(cfg, "model").get("hf_path") or EMBEDDED_MODEL_DIR


def check_model_files(source: ModelSource) -> None:
    """config.json and tokenizer files where the server and the prompts need them."""
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models.tiny import MissingTokenizer, check_tokenizer_files

    try:
        load_hf_config(source.hf_dir)
        check_tokenizer_files(source.hf_dir)
    except (FileNotFoundError, MissingTokenizer) as e:
        raise EvalError(f"{e}. Fix: pass --hf-config with the base model's directory") from None
    if source.kind == "hf":
        weights = [n for n in os.listdir(source.path) if n.endswith((".safetensors", ".bin"))]
        if not weights:
            raise EvalError(f"--model {source.path}: config.json but no *.safetensors or *.bin "
                            f"weights. Fix: point --model at a complete HF checkpoint")


def stored_dtype(mcore_dir: str) -> str:
    """Dtype of the model weights in a dist checkpoint (from its metadata, not its config)."""
    from torch.distributed.checkpoint import FileSystemReader

    from srft_mcore.models.builder import DTYPES

    meta = FileSystemReader(mcore_dir).read_metadata().state_dict_metadata
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        key = next((k for k in meta if k.startswith(("embedding.", "decoder."))), None)
    if key is None:
        raise EvalError(f"{mcore_dir} holds no model weights. Fix: point --model at a "
                        f"complete trainer checkpoint")
    names = {v: k for k, v in DTYPES.items()}
    return names.get(meta[key].properties.dtype, "float32")


def stage_trainer_checkpoint(source: ModelSource, stage: str) -> str:
    """Lay a trainer checkpoint out as the converter's input (its mcore/ files linked, the
    base model's side files in hf/, the conversion record); returns ``stage``."""
    from srft_mcore.config.hf_config import load_hf_config
    from tools.convert_ckpt.hf_to_mcore import BRIDGE_META, HF_SUBDIR, source_dtype
    from tools.convert_ckpt.outdir import copy_side_files

    mcore = os.path.join(source.path, "mcore")
    os.makedirs(stage)
    for name in os.listdir(mcore):
        os.symlink(os.path.join(mcore, name), os.path.join(stage, name))
    copy_side_files(source.hf_dir, os.path.join(stage, HF_SUBDIR))
    hf = load_hf_config(source.hf_dir)
    meta = {"format": "srft_mcore dist_checkpointing", "version": 1,
            "model_type": hf.get("model_type"), "source": source.path, "tp": 1, "pp": 1,
            "dtype": stored_dtype(mcore), "source_dtype": source_dtype(hf),
            "vocab_size": hf.get("vocab_size"),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}
    with open(os.path.join(stage, BRIDGE_META), "w") as f:
        json.dump(meta, f, indent=2)
    return stage


def materialize(source: ModelSource, work_dir: str) -> str:
    """A HF directory SGLang can serve: the model itself, or a conversion in ``work_dir``."""
    if source.kind == "hf":
        return source.path
    from srft_mcore.models.name_map import BridgeError
    from srft_mcore.launching.local import RankFailed
    from srft_mcore.models import UnsupportedArchitecture
    from tools.convert_ckpt.mcore_to_hf import CheckpointFormatError, mcore_to_hf

    ckpt = source.path
    if source.kind == "trainer":
        ckpt = stage_trainer_checkpoint(source, os.path.join(work_dir, "mcore_staged"))
    out = os.path.join(work_dir, "hf")
    try:
        mcore_to_hf(ckpt, out, overwrite=True)
    except (BridgeError, CheckpointFormatError, RankFailed, UnsupportedArchitecture,
            FileNotFoundError, ValueError) as e:
        raise EvalError(f"converting {source.path} to a HF checkpoint failed: {e}\nFix: pass "
                        f"--hf-config with the HF model the checkpoint was trained from "
                        f"(its config must match the checkpoint's shapes)") from None
    return out


def server_override_args(source: ModelSource) -> list:
    """The run's model.rope_theta / model.max_position_embeddings for the served model."""
    model = config_section(source.run_config, "model")
    theta, positions = model.get("rope_theta"), model.get("max_position_embeddings")
    if theta is None and positions is None:
        return []
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.rollout.server import model_override_args

    overrides = model_override_args(load_hf_config(source.hf_dir), theta, positions)
    args = ["--json-model-override-args", json.dumps(overrides, sort_keys=True)]
    if positions is not None:
        args += ["--context-length", str(int(positions))]
    return args


def url_source(urls: list, hf_config: Optional[str], run_config: Optional[str]) -> ModelSource:
    """A ModelSource for attached servers: the tokenizer from --hf-config or the server's."""
    import requests

    path = hf_config
    if path is None:
        try:
            info = requests.get(urls[0].rstrip("/") + "/model_info", timeout=30).json()
            path = info.get("tokenizer_path") or info.get("model_path")
        except (requests.RequestException, ValueError) as e:
            raise EvalError(f"--url {urls[0]}: /model_info did not answer ({e}). Fix: check "
                            f"the URL, or pass --hf-config DIR for the tokenizer") from None
        if not path or not os.path.isdir(path):
            raise EvalError(f"--url {urls[0]} serves {path!r}, not a local directory here, so "
                            f"its tokenizer cannot be read. Fix: pass --hf-config DIR")
    cfg_path = os.path.abspath(run_config) if run_config else None
    return ModelSource(kind="url", path=",".join(urls), hf_dir=os.path.abspath(path),
                       run_config=read_run_config(cfg_path), run_config_path=cfg_path)
