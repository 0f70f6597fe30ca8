"""The full SRFT loss through policy_forward inside Megatron's forward-backward schedule:
loss and gradients under TP2 (both fused modes), PP2 and DP2 equal a
single rank; plus the policy's (log-prob, entropy) against the model's own logits."""

import pytest
import torch

from srft_mcore.launching.local import spawn_ranks

# 500 real tokens, padded by Megatron to 512: the last TP shard holds padding
HF = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=500,
          hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
          max_position_embeddings=64, tie_word_embeddings=False)
SEQ, PROMPTS, GROUP = 12, 2, 4  # 3 rollouts + 1 demonstration per prompt


def _global_batch(seed=7):
    from srft_mcore.algo import group_advantages

    g = torch.Generator().manual_seed(seed)
    n = PROMPTS * GROUP
    tokens = torch.randint(0, HF["vocab_size"], (n, SEQ), generator=g)
    targets = torch.randint(0, HF["vocab_size"], (n, SEQ), generator=g)
    start = torch.randint(3, 6, (n, 1), generator=g)
    length = torch.randint(2, SEQ - 5, (n, 1), generator=g)
    pos = torch.arange(SEQ).unsqueeze(0)
    loss_mask = ((pos >= start) & (pos < start + length)).float()
    is_demo = (torch.arange(n) % GROUP) == GROUP - 1
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards, torch.arange(n) // GROUP, is_demo)
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, is_demo=is_demo,
                rewards=rewards, advantages=adv)


def _rank(tp, pp, micro_batch, sequence_parallel, fused, reference, save_to):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from srft_mcore.algo import batch_totals, make_loss_func, reduce_metrics
    from srft_mcore.config import AlgorithmConfig, ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model
    from srft_mcore.models.policy import policy_forward
    from srft_mcore.models.sharding import global_name, partition_dim, split_for_rank
    from srft_mcore.doctor.parallel_check import _init_params

    lay = init_distributed(tp=tp, pp=pp, seed=1)
    model = build_model(HF, ModelConfig(), ParallelConfig(tp=tp, pp=pp, dp=lay.dp,
                                                          sequence_parallel=sequence_parallel))
    _init_params(model, 1, tp, lay.tp_rank)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False), module=model)

    batch = _global_batch()
    per_dp = batch["tokens"].shape[0] // lay.dp
    local = {k: v[lay.dp_rank * per_dp:(lay.dp_rank + 1) * per_dp] for k, v in batch.items()}
    n_micro = per_dp // micro_batch
    totals = batch_totals(local["loss_mask"], local["is_demo"], max_len=SEQ,
                          dp_group=lay.dp_group)
    cfg = AlgorithmConfig(name="srft", entropy_coef=0.01,  # entropy gradient flows too
                          entropy_weighting="token")
    loss_func = make_loss_func(cfg, totals, num_microbatches=n_micro, dp_size=lay.dp)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(micro_batch, -1)

    def micro_batches():
        for i in range(n_micro):
            yield {k: v[i * micro_batch:(i + 1) * micro_batch] for k, v in local.items()}

    def forward_step(it, m):
        mb = next(it)
        out = policy_forward(m, mb["tokens"], position_ids, mb["targets"],
                             vocab_size=HF["vocab_size"], tp_group=lay.tp_group, fused=fused,
                             chunk_size=5, entropy_grad=True)
        return out, lambda output: loss_func(mb, output)

    ddp.zero_grad_buffer()
    metric_dicts = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro_batches(), model=[ddp],
        num_microbatches=n_micro, seq_length=SEQ, micro_batch_size=micro_batch,
        decoder_seq_length=SEQ, forward_only=False)
    ddp.finish_grad_sync()
    metrics = reduce_metrics(metric_dicts, lay.dp_group) if lay.is_last_stage else {}
    stats = torch.tensor([metrics.get("loss", 0.0), metrics.get("loss/sft", 0.0)],
                         dtype=torch.float64)
    torch.distributed.all_reduce(stats, group=lay.pp_group)  # from the last stage

    grads = {global_name(model, n): p.main_grad.detach().clone()
             for n, p in model.named_parameters()}
    out = {"loss": stats[0].item(), "loss_sft": stats[1].item()}
    if save_to:
        torch.save({"grads": grads, **out}, save_to)
    if reference:
        ref = torch.load(reference)
        diff, scale = 0.0, 0.0
        for n, p in model.named_parameters():
            name = global_name(model, n)
            want = split_for_rank(ref["grads"][name], name, partition_dim(p), tp, lay.tp_rank)
            diff = max(diff, (want - grads[name]).abs().max().item())
            scale = max(scale, want.abs().max().item())
        out.update(ref_loss=ref["loss"], ref_loss_sft=ref["loss_sft"], grad_diff=diff,
                   grad_scale=scale)
    return out


def _policy_vs_logits_rank():
    """policy_forward on one rank against the model's own logits + a plain softmax
    (log-prob, entropy: max abs difference; parameter gradients: relative to their max)."""
    from srft_mcore.config import ModelConfig, ParallelConfig
    from srft_mcore.launching.distributed import init_distributed
    from srft_mcore.models import build_model
    from srft_mcore.models.policy import policy_forward
    from srft_mcore.ops import reference_logprob_entropy
    from srft_mcore.doctor.parallel_check import _init_params

    init_distributed(tp=1, pp=1, seed=1)
    out = {}
    for tied in (False, True):
        hf = dict(HF, tie_word_embeddings=tied)
        model = build_model(hf, ModelConfig(), ParallelConfig())
        _init_params(model, 1, 1, 0)
        batch = _global_batch()
        pos = torch.arange(SEQ).unsqueeze(0).expand(batch["tokens"].shape[0], -1)
        logits = model(batch["tokens"], pos, None)  # [b, s, padded v]
        ref_lp, ref_ent = reference_logprob_entropy(logits, batch["targets"], hf["vocab_size"])
        (ref_lp.sum() + ref_ent.sum()).backward()
        ref_grads = [p.grad.clone() for p in model.parameters()]
        for fused in ("linear", "logits"):
            model.zero_grad()
            lp, ent = policy_forward(model, batch["tokens"], pos, batch["targets"],
                                     vocab_size=hf["vocab_size"], fused=fused,
                                     entropy_grad=True, chunk_size=7)
            (lp.sum() + ent.sum()).backward()
            gd = max((p.grad - g).abs().max().item() / g.abs().max().clamp(min=1.0).item()
                     for p, g in zip(model.parameters(), ref_grads))
            out[(tied, fused)] = ((lp - ref_lp).abs().max().item(),
                                  (ent - ref_ent).abs().max().item(), gd)
    return out


@pytest.mark.slow
def test_policy_forward_matches_model_logits():
    for key, (d_lp, d_ent, d_grad) in spawn_ranks(_policy_vs_logits_rank, 1, (),
                                                  timeout_s=300)[0].items():
        assert max(d_lp, d_ent, d_grad) < 1e-5, (key, d_lp, d_ent, d_grad)


@pytest.mark.slow
def test_srft_loss_under_tp2_pp2_dp2_equals_tp1(tmp_path):
    ref = str(tmp_path / "reference.pt")
    base = spawn_ranks(_rank, 1, (1, 1, 4, False, "linear", None, ref), timeout_s=300)[0]
    assert base["loss"] != 0.0 and base["loss_sft"] > 0.0
    layouts = [  # (world, tp, pp, micro batch, sequence parallel, fused)
        (2, 2, 1, 2, False, "linear"),
        (2, 2, 1, 8, False, "logits"),  # (sequence parallelism needs TE norms: GPU only)
        (2, 1, 2, 1, False, "logits"),
        (2, 1, 1, 1, False, "linear"),  # DP2, 4 micro-batches per rank
    ]
    for world, tp, pp, mb, sp, fused in layouts:
        for res in spawn_ranks(_rank, world, (tp, pp, mb, sp, fused, ref, None), timeout_s=300):
            assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-6, abs=1e-6), res
            assert res["loss_sft"] == pytest.approx(res["ref_loss_sft"], rel=1e-6, abs=1e-6)
            assert res["grad_diff"] <= 1e-5 * max(1.0, res["grad_scale"]), (tp, pp, mb, res)
