"""Parallel-layout self-check: a tiny Qwen2-shaped model under TP/PP/DP vs one rank.

Every layout starts from the same weights (generated per global parameter name from a
seed, then split for the rank), runs the same global batch through Megatron's
forward-backward schedule (micro-batches, pipeline, DDP) and one optimizer step. The
reference run (1 rank) saves its loss, full gradients and updated weights; a layout run
compares its shards against them. Used by ``srft-doctor parallel`` and the tests.
"""
from __future__ import annotations

import os
import zlib
from typing import Optional

import torch

TINY_QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=512,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False)


# under PP a tied output layer is the last stage's own copy of the word embeddings
TIED_COPY = {"output_layer.weight": "embedding.word_embeddings.weight"}

# what a layout may differ from one rank by: fp32 rounding, or bf16 (8-bit mantissa) matmuls
# and bf16 updated weights summed in another order
TOLERANCE = {"float32": {"loss": 1e-6, "grad": 1e-5, "param": 1e-5},
             "bfloat16": {"loss": 2e-2, "grad": 5e-2, "param": 2e-2}}


def _init_params(model, seed: int, tp_size: int, tp_rank: int, gated: bool = True) -> None:
    from srft_mcore.models.sharding import full_shape, global_name, partition_dim, split_for_rank

    tied = model.share_embeddings_and_output_weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = global_name(model, name)
            seed_name = TIED_COPY.get(gname, gname) if tied else gname
            g = torch.Generator().manual_seed(seed + zlib.crc32(seed_name.encode()))
            full = torch.randn(full_shape(p, tp_size), generator=g) * 0.2
            if gname.endswith("layernorm.weight") or gname.endswith("norm.weight"):
                full = 1.0 + full
            p.copy_(split_for_rank(full, gname, partition_dim(p), tp_size, tp_rank, gated))


def _batch(global_batch: int, seq_len: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (global_batch, seq_len), generator=g)
    labels = torch.randint(0, vocab, (global_batch, seq_len), generator=g)
    return tokens, labels


def run_rank(tp: int, pp: int, global_batch: int = 8, micro_batch: int = 1, seq_len: int = 16,
             distributed_optimizer: bool = False, reference: Optional[str] = None,
             save_to: Optional[str] = None, hf_config: Optional[dict] = None, seed: int = 1234,
             fault_plain_fc1_split: bool = False, dtype: str = "float32", tied: bool = False,
             finalize_grads: bool = True):
    """Body of one rank. Returns {'loss', 'max_grad_diff', 'max_param_diff', ...}.

    ``fault_plain_fc1_split`` loads the fused gate/up weight with a plain TP chunk (a
    classic conversion bug) so tests can show that the comparison catches it. ``tied``:
    tied word embeddings (under PP the first stage's embedding and the last stage's output
    layer must stay one weight: ``tied_weight_diff``). ``finalize_grads=False`` leaves out
    Megatron's ``finalize_model_grads`` (as the trainer sets it), for the negative test.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model
    from srft_mcore.models.sharding import global_name, partition_dim, split_for_rank

    from megatron.core.distributed import finalize_model_grads

    hf = dict(hf_config or TINY_QWEN2, tie_word_embeddings=tied)
    layout = init_distributed(tp=tp, pp=pp, seed=seed)
    par = ParallelConfig(tp=tp, pp=pp, dp=layout.dp)
    model = build_model(hf, ModelConfig(dtype=dtype), par)
    _init_params(model, seed, tp, layout.tp_rank, gated=not fault_plain_fc1_split)
    tconfig = model.config
    if finalize_grads:  # DP, tied-embedding and SP-norm grads, as the trainer does
        tconfig.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(
        tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer),
        module=model)
    optimizer = get_megatron_optimizer(
        # Adam (the distributed optimizer requires it) with eps=1: the first update
        # lr*g/(|g|+eps) stays close to linear in g, so weight differences remain comparable to
        # gradient differences (a small eps turns rounding noise of tiny grads into +-lr)
        OptimizerConfig(optimizer="adam", lr=0.1, adam_eps=1.0, weight_decay=0.0, clip_grad=0.0,
                        use_distributed_optimizer=distributed_optimizer,
                        bf16=dtype == "bfloat16", params_dtype=tconfig.params_dtype), [ddp])

    tokens, labels = _batch(global_batch, seq_len, hf["vocab_size"], seed)
    per_dp = global_batch // layout.dp
    sl = slice(layout.dp_rank * per_dp, (layout.dp_rank + 1) * per_dp)
    tokens, labels = tokens[sl], labels[sl]
    n_micro = per_dp // micro_batch
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(micro_batch, -1)

    def data_iter():
        for i in range(n_micro):
            s = slice(i * micro_batch, (i + 1) * micro_batch)
            yield tokens[s], labels[s]

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}

    def forward_step(it, m):
        tok, lab = next(it)
        return m(tok, position_ids, None, labels=lab), loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iter(), model=[ddp],
        num_microbatches=n_micro, seq_length=seq_len, micro_batch_size=micro_batch,
        decoder_seq_length=seq_len, forward_only=False)
    if not finalize_grads:
        ddp.finish_grad_sync()

    # loss averaged over micro-batches and DP ranks, broadcast from the last stage
    loss = torch.tensor(0.0, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        loss += torch.stack([d["loss"] for d in losses]).double().mean()
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    loss /= layout.dp

    def ref_name(n):  # the single-rank model holds one tied weight, the embedding
        name = global_name(model, n)
        return TIED_COPY.get(name, name) if tied else name

    grads = {ref_name(n): p.main_grad.detach().float().clone()
             for n, p in model.named_parameters()}
    update_ok, grad_norm, _ = optimizer.step()
    params = {ref_name(n): p.detach().float().clone() for n, p in model.named_parameters()}
    dims = {ref_name(n): partition_dim(p) for n, p in model.named_parameters()}

    result = {"rank": layout.rank, "loss": loss.item(), "update_ok": bool(update_ok),
              "grad_norm": float(grad_norm) if grad_norm is not None else None,
              "dtype": dtype, "tied": tied}
    if tied and pp > 1:
        result["tied_weight_diff"] = _tied_copies_diff(model, layout)
    if save_to is not None:
        assert tp == 1 and pp == 1, "the reference run is single-rank"
        if layout.rank == 0:
            torch.save({"loss": loss.item(), "grads": grads, "params": params}, save_to)
    if reference is not None:
        ref = torch.load(reference)
        gdiff = pdiff = 0.0
        for name, g in grads.items():
            want = split_for_rank(ref["grads"][name], name, dims[name], tp, layout.tp_rank)
            if want.shape != g.shape:
                raise AssertionError(f"{name}: shard shape {tuple(g.shape)} vs reference "
                                     f"{tuple(want.shape)}")
            gdiff = max(gdiff, (want - g).abs().max().item())
            want_p = split_for_rank(ref["params"][name], name, dims[name], tp, layout.tp_rank)
            pdiff = max(pdiff, (want_p - params[name]).abs().max().item())
        stats = torch.tensor([gdiff, pdiff], dtype=torch.float64)
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        # with the distributed optimizer each DP rank holds only its reduce-scattered part of
        # the gradient buffer, so the gradient comparison is meaningful without it only
        result.update(reference_loss=ref["loss"], loss_diff=abs(ref["loss"] - loss.item()),
                      max_grad_diff=None if distributed_optimizer else stats[0].item(),
                      max_param_diff=stats[1].item())
    return result


def _tied_copies_diff(model, layout) -> float:
    """Max |first stage's word embedding - last stage's output weight| (this TP shard)."""
    import torch.distributed as dist

    gpt = model
    mine = gpt.shared_embedding_or_output_weight().detach().float().contiguous()
    first = mine.clone()
    dist.broadcast(first, src=dist.get_global_rank(layout.pp_group, 0), group=layout.pp_group)
    diff = torch.tensor([(first - mine).abs().max().item()], dtype=torch.float64)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def check_layout(tp: int, pp: int, dp: int, workdir: str, distributed_optimizer: bool = False,
                 global_batch: int = 8, micro_batch: int = 1, timeout_s: float = 600.0,
                 dtype: str = "float32", tied: bool = False, finalize_grads: bool = True) -> dict:
    """Run the single-rank reference and the layout; return rank 0's comparison with the
    tolerances of ``dtype`` and ``ok``."""
    from srft_mcore.launching.local import spawn_ranks

    os.makedirs(workdir, exist_ok=True)
    kind = dict(dtype=dtype, tied=tied)
    ref = os.path.join(workdir, f"reference_gb{global_batch}_{dtype}{'_tied' * tied}.pt")
    if not os.path.exists(ref):
        spawn_ranks(run_rank, 1, (1, 1, global_batch, micro_batch, 16, False, None, ref),
                    kwargs=kind, timeout_s=timeout_s)
    out = spawn_ranks(run_rank, tp * pp * dp,
                      (tp, pp, global_batch, micro_batch, 16, distributed_optimizer, ref),
                      kwargs=dict(kind, finalize_grads=finalize_grads), timeout_s=timeout_s)
    res = out[0]
    tol = TOLERANCE[dtype]
    res.update(tp=tp, pp=pp, dp=dp, distributed_optimizer=distributed_optimizer,
               num_microbatches=global_batch // dp // micro_batch, tolerance=tol)
    scale = max(abs(res["reference_loss"]), 1.0)
    res["ok"] = bool(res["loss_diff"] <= tol["loss"] * scale
                     and (res["max_grad_diff"] is None or res["max_grad_diff"] <= tol["grad"])
                     and res["max_param_diff"] <= tol["param"]
                     and res.get("tied_weight_diff", 0.0) <= tol["param"])
    return res
