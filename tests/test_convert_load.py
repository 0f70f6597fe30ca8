"""`srft-convert hf-to-mcore` (streamed, tensor by tensor) writes the checkpoint that
megatron's own ``dist_checkpointing.save`` writes for the bridge-loaded model: same DCP
``.metadata`` (keys, shapes, dtypes, chunks), ``common.pt`` and ``metadata.json``, same
tensors. Megatron's ``dist_checkpointing.load`` of it at TP1 and TP2 (gloo ranks, each
loading a checkpoint written at the other TP size) gives the transformers logits."""
import json
import os

import pytest
import torch

from srft_mcore.launching.local import spawn_ranks
from srft_mcore.models.tiny import make_tiny_hf_model
from srft_mcore.doctor.parity import reference_logits, sample_tokens

pytestmark = pytest.mark.slow
TOL = 1e-4


def _build(hf_dir, tp):
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.config.hf_config import load_hf_config
    from srft_mcore.models import build_model

    layout = init_distributed(tp=tp, pp=1)
    hf = load_hf_config(hf_dir)
    model = build_model(hf, ModelConfig(dtype="float32", transformer_impl="local"),
                        ParallelConfig(tp=tp, pp=1))
    return layout, hf, model


def _megatron_save_rank(hf_dir, out, tp):
    """Reference: the whole model loaded in memory, saved by dist_checkpointing.save."""
    from megatron.core import dist_checkpointing

    from srft_mcore.models.bridge import load_hf_into_model

    layout, hf, model = _build(hf_dir, tp)
    load_hf_into_model(model, hf_dir, hf, tp_group=layout.tp_group)
    dist_checkpointing.save(model.sharded_state_dict(), out)


def _load_rank(hf_dir, ckpt, reference_ckpt, ref, tp):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from srft_mcore.doctor.parity import pipeline_forward

    layout, hf, model = _build(hf_dir, tp)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt)
    want = dist_checkpointing.load(model.sharded_state_dict(), reference_ckpt)
    differ = sorted(k for k, v in state.items()
                    if isinstance(v, torch.Tensor) and not torch.equal(v, want[k]))
    model.load_state_dict(state)
    model.eval()
    ref = torch.load(ref)
    logits = pipeline_forward(model, ref["tokens"], layout)
    diff = (logits[..., :hf["vocab_size"]] - ref["logits"]).abs().max().double()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {"max_abs_diff": diff.item(), "differ_from_megatron_save": differ,
            "padded_logits_max": logits[..., hf["vocab_size"]:].abs().max().item()}


def _dcp_layout(ckpt):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(ckpt).read_metadata()
    out = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            out[key] = (tuple(m.size), m.properties.dtype,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in m.chunks))
        else:
            out[key] = type(m).__name__
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tools.convert_ckpt.hf_to_mcore import hf_to_mcore

    root = tmp_path_factory.mktemp("convert_load")
    hf_dir = make_tiny_hf_model(str(root / "hf"), "qwen2", tied=True, vocab_size=300, seed=5)
    tokens = sample_tokens(300, batch=2, seq_len=12, seed=5)
    ref = str(root / "ref.pt")
    torch.save({"tokens": tokens, "logits": reference_logits(hf_dir, tokens)}, ref)
    out = {"hf": hf_dir, "ref": ref}
    for tp in (1, 2):
        out[f"stream_tp{tp}"] = str(root / f"stream_tp{tp}")
        hf_to_mcore(hf_dir, out[f"stream_tp{tp}"], tp=tp, timeout_s=300)
        out[f"megatron_tp{tp}"] = str(root / f"megatron_tp{tp}")
        os.makedirs(out[f"megatron_tp{tp}"])
        spawn_ranks(_megatron_save_rank, tp, (hf_dir, out[f"megatron_tp{tp}"], tp),
                    timeout_s=300)
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_same_files_as_dist_checkpointing_save(checkpoints, tp):
    ours, theirs = checkpoints[f"stream_tp{tp}"], checkpoints[f"megatron_tp{tp}"]
    assert _dcp_layout(ours) == _dcp_layout(theirs)
    for name in ("metadata.json",):
        assert json.load(open(os.path.join(ours, name))) == \
            json.load(open(os.path.join(theirs, name)))
    assert torch.load(os.path.join(ours, "common.pt"), weights_only=False) == \
        torch.load(os.path.join(theirs, "common.pt"), weights_only=False)
    # one file per rank, named as megatron names them
    assert sorted(f for f in os.listdir(ours) if f.endswith(".distcp")) == \
        [f"__{r}_0.distcp" for r in range(tp)]


@pytest.mark.parametrize("load_tp,written_tp", [(1, 2), (2, 1)])
def test_dist_checkpointing_load_matches_hf_logits(checkpoints, load_tp, written_tp):
    c = checkpoints
    res = spawn_ranks(_load_rank, load_tp,
                      (c["hf"], c[f"stream_tp{written_tp}"], c[f"megatron_tp{written_tp}"],
                       c["ref"], load_tp), timeout_s=300)
    for r in res:
        assert r["differ_from_megatron_save"] == [], r
    assert res[0]["max_abs_diff"] <= TOL, res[0]
    assert res[0]["padded_logits_max"] == 0.0, res[0]  # padded vocab rows stay zero
