"""HF <-> Megatron tensor names and sizes: a family's name table applied to one HF config.

The per-architecture table lives in ``models/<family>.py`` (:class:`TensorMap` entries,
chosen by ``model_type``); this module answers the questions about names and shapes, without
touching tensor data (``bridge.py`` moves the tensors):

* :func:`lookup` / :func:`hf_names`: the map entry, global layer and HF names of a Megatron
  tensor name. Model parameter names of either layer spec (local, or transformer-engine with
  its norms fused into ``linear_qkv`` / ``linear_fc1``) are accepted.
* :func:`mcore_names` / :func:`expected_hf_shapes`: every tensor of the full model.
* :class:`Dims` / :func:`check_tp`: the sizes the layouts need, and whether TP splits them.
* :func:`checkpoint_naming` / :func:`checkpoint_renames`: which layer spec's names a Megatron
  dist checkpoint stores its tensors under, and the key each tensor is read from, for every
  reader of such checkpoints (``srft-convert mcore-to-hf``, ``srft-eval``,
  ``model.load_mcore``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from srft_mcore.models.arch import TensorMap
from srft_mcore.models.registry import get_architecture

_LAYER_RE = re.compile(r"^(decoder\.layers\.)(\d+)(\..+)$")


class BridgeError(ValueError):
    """A checkpoint or model that the bridge cannot map; the message names the tensor."""


# --------------------------------------------------------------------------- dimensions
@dataclass(frozen=True)
class Dims:
    """The sizes the layouts need, from the HF config (and the model's padded vocab)."""

    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    tied: bool

    @property
    def q_per_group(self) -> int:
        return self.heads // self.groups

    @classmethod
    def from_hf(cls, hf: dict) -> "Dims":
        heads = hf["num_attention_heads"]
        return cls(hidden=hf["hidden_size"], heads=heads,
                   groups=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   ffn=hf["intermediate_size"], vocab=hf["vocab_size"],
                   layers=hf["num_hidden_layers"],
                   tied=bool(hf.get("tie_word_embeddings", False)))


def check_tp(hf: dict, tp: int) -> None:
    """Raise a clear error when ``tp`` cannot split this model's heads / groups / MLP."""
    d = Dims.from_hf(hf)
    for what, n in (("num_attention_heads", d.heads), ("num_key_value_heads", d.groups),
                    ("intermediate_size", d.ffn)):
        if n % tp:
            raise BridgeError(f"tensor parallel size {tp} does not divide {what}={n}; "
                              f"pick a TP size that divides {d.heads} heads and {d.groups} "
                              f"key/value groups")


# --------------------------------------------------------------------------- name map
def layer_template(name: str) -> tuple[str, Optional[int]]:
    m = _LAYER_RE.match(name)
    if not m:
        return name, None
    return f"{m.group(1)}{{i}}{m.group(3)}", int(m.group(2))


def tensor_maps(hf: dict, te: bool = False) -> dict:
    """Megatron name template -> :class:`TensorMap` for this config (conditions applied)."""
    arch = get_architecture(hf)
    out = {}
    for tm in arch.tensors:
        if arch.condition(tm.when, hf):
            out[(tm.te_mcore or tm.mcore) if te else tm.mcore] = tm
    return out


def lookup(hf: dict, mcore_name: str, te: Optional[bool] = None) -> tuple[TensorMap, Optional[int]]:
    """The map entry and global layer of a global Megatron name (exact match, no substrings).

    ``te=None`` accepts names of either spec. The tied ``output_layer.weight`` (last PP stage
    copy of the embedding) maps to the embedding's entry.
    """
    template, layer = layer_template(mcore_name)
    specs = (False, True) if te is None else (te,)
    for spec in specs:
        tm = tensor_maps(hf, te=spec).get(template)
        if tm is not None:
            return tm, layer
    if template == "output_layer.weight" and hf.get("tie_word_embeddings", False):
        return tensor_maps(hf)["embedding.word_embeddings.weight"], None
    arch = get_architecture(hf)
    raise BridgeError(f"Megatron tensor {mcore_name!r} has no HF counterpart in the "
                      f"{arch.model_type} map (srft_mcore/models/{arch.model_type}.py)")


def hf_names(tm: TensorMap, layer: Optional[int]) -> list[str]:
    return [n.format(i=layer) for n in tm.hf]


def mcore_names(hf: dict, te: bool = False) -> list[str]:
    """Every global Megatron tensor name of the full model (PP1), in checkpoint order."""
    maps = tensor_maps(hf, te=te)
    head = [t for t in maps if "{i}" not in t and t.startswith("embedding.")]
    tail = [t for t in maps if "{i}" not in t and not t.startswith("embedding.")]
    layers = [t.format(i=i) for i in range(Dims.from_hf(hf).layers) for t in maps if "{i}" in t]
    return head + layers + tail


def expected_hf_shapes(hf: dict) -> dict:
    """HF name -> shape of every tensor the HF checkpoint must hold, in checkpoint order."""
    d = Dims.from_hf(hf)
    q, kv = d.heads * d.head_dim, d.groups * d.head_dim
    out = {}
    for name in mcore_names(hf):
        tm, layer = lookup(hf, name, te=False)
        names = hf_names(tm, layer)
        bias = name.endswith(".bias")
        if tm.layout == "vocab":
            shapes = [(d.vocab, d.hidden)]
        elif tm.layout == "replicated":  # norms: hidden wide, or head_dim (q/k norms)
            shapes = [(getattr(d, tm.size),)]
        elif tm.layout == "qkv":
            shapes = [(q,), (kv,), (kv,)] if bias else [(q, d.hidden), (kv, d.hidden), (kv, d.hidden)]
        elif tm.layout == "gate_up":
            shapes = [(d.ffn, d.hidden)] * 2
        elif name.endswith("linear_proj.weight"):
            shapes = [(d.hidden, q)]
        else:  # linear_fc2 (row)
            shapes = [(d.hidden, d.ffn)]
        out.update(zip(names, (torch.Size(s) for s in shapes)))
    return out


# --------------------------------------------------------------------------- checkpoint keys
CHECKPOINT_NAMINGS = ("transformer_engine", "local")
"""How a Megatron dist checkpoint names the norms that the TE spec fuses into its linears.

``transformer_engine``: ``self_attention.linear_qkv.layer_norm_weight`` and
``mlp.linear_fc1.layer_norm_weight``, the names Megatron-Core writes for both layer specs
(its local spec maps ``input_layernorm.`` / ``pre_mlp_layernorm.`` to them when it saves).
``local``: the local spec's own module names (``input_layernorm.weight``,
``pre_mlp_layernorm.weight``), as a checkpoint saved under the module names holds them.
Both come from the family's name map (:class:`TensorMap` ``mcore`` / ``te_mcore``)."""
_CKPT_LAYER_RE = re.compile(r"^decoder\.layers\.(?:\d+|\{i\})\.")
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def checkpoint_key(name: str) -> str:
    """The dist-checkpoint key of a Megatron tensor name or map template: a layer's tensor
    is stored once for all layers (stacked on a leading layer axis), without its number."""
    return _CKPT_LAYER_RE.sub("decoder.layers.", name)


def checkpoint_names(hf: dict, naming: str) -> dict:
    """Dist-checkpoint key -> :class:`TensorMap` of every model tensor a checkpoint of this
    config stores under ``naming`` (one of :data:`CHECKPOINT_NAMINGS`)."""
    if naming not in CHECKPOINT_NAMINGS:
        raise ValueError(f"naming {naming!r} not in {CHECKPOINT_NAMINGS}")
    te = naming == "transformer_engine"
    return {checkpoint_key(t): tm for t, tm in tensor_maps(hf, te=te).items()}


def model_weight_keys(keys: Iterable[str]) -> set:
    """The model weights among a dist checkpoint's keys: no optimizer state, no
    ``_extra_state`` objects (TE modules store one each, the local spec's norms none)."""
    return {k for k in keys if k.startswith(_MODEL_PREFIXES) and "_extra_state" not in k}


def checkpoint_naming(hf: dict, keys: Iterable[str], where: str = "the checkpoint") -> str:
    """Which of :data:`CHECKPOINT_NAMINGS` a dist checkpoint's keys use (``keys``: all of
    them, e.g. ``FileSystemReader(dir).read_metadata().state_dict_metadata``); a
    :class:`BridgeError` naming the unexpected and missing keys when neither matches."""
    stored = model_weight_keys(keys)
    diff = {}
    for naming in CHECKPOINT_NAMINGS:
        want = set(checkpoint_names(hf, naming))
        if stored == want:
            return naming
        diff[naming] = (sorted(stored - want), sorted(want - stored))
    naming = min(CHECKPOINT_NAMINGS, key=lambda n: len(diff[n][0]) + len(diff[n][1]))
    unexpected, missing = diff[naming]
    want = sorted(checkpoint_names(hf, naming))
    arch = get_architecture(hf)

    def few(names):
        return f"{names[:6]}{' ...' if len(names) > 6 else ''}"

    raise BridgeError(
        f"{where}: its model tensors match neither the transformer-engine nor the local "
        f"layer-spec names of the {arch.model_type} map (srft_mcore/models/"
        f"{arch.model_type}.py) for this HF config. Closest are the {naming} names: "
        f"{len(unexpected)} unexpected keys {few(unexpected)}, {len(missing)} missing keys "
        f"{few(missing)}; expected {len(want)} keys: {few(want)}")


def checkpoint_renames(hf: dict, naming: str) -> dict:
    """Dist-checkpoint key under either naming -> the key a checkpoint of ``naming`` stores
    it under (only the keys the two namings name differently)."""
    out = {}
    target = naming == "transformer_engine"
    for tm in tensor_maps(hf).values():
        if tm.te_mcore:
            local, te = checkpoint_key(tm.mcore), checkpoint_key(tm.te_mcore)
            stored = te if target else local
            for key in (local, te):
                if key != stored:
                    out[key] = stored
    return out
