"""No blocking host-device traffic in the training step beyond the fixed per-step work, seen
on CPU: :class:`host_sync.HostSyncCounter` counts the calls that make the host wait for a
GPU (read-backs, tensors built from Python data, blocking device moves). The fused kernel
makes none; a training step makes the same number for 8 micro-batches as for 2. The negative
control adds one ``.item()`` to the loss and the same comparison fails."""
import pytest
import torch

from host_sync import PROJECT, HostSyncCounter, count_host_syncs
from srft_mcore.launching.local import spawn_ranks


def test_counter_sees_each_kind_and_not_the_device_side_forms():
    x = torch.ones(3)
    with HostSyncCounter(scope=None) as c:
        x.sum().item()
        x.tolist()
        bool(x[0] > 0)
        torch.tensor(2.0)
        x.to("cpu")
        x.to("cpu", non_blocking=True)  # not counted: the batch's one transfer
        x.to(torch.float64)  # a dtype, no device
        torch.full((), 2.0, device=x.device)  # a fill on the device
        torch.as_tensor(x)  # already a tensor
    assert c.by_kind() == {"readback": 3, "from_python": 1, "move": 1}, c.by_site()
    assert all("test_host_syncs.py:" in site for site in c.by_site()), c.by_site()


def test_fused_kernel_makes_no_host_round_trip():
    from srft_mcore.ops import linear_vocab_parallel_logprob_entropy, \
        linear_vocab_parallel_token_loss, vocab_parallel_logprob_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 32, generator=g).requires_grad_()
    w = torch.randn(160, 32, generator=g).requires_grad_()
    t = torch.randint(0, 150, (64,), generator=g)
    misses = torch.zeros(())

    def both():
        lp, ent = linear_vocab_parallel_logprob_entropy(h, w, t, vocab_size=150, chunk_size=16,
                                                        temperature=0.7)
        (lp.sum() + ent.sum()).backward()
        logits = (h @ w.t()).detach().requires_grad_()
        lp, ent = vocab_parallel_logprob_entropy(logits, t, vocab_size=150, chunk_size=16)
        (lp.sum() + ent.sum()).backward()
        # the loss in the kernel, its separability counted on the device
        linear_vocab_parallel_token_loss(h, w, t, lambda lp, ent: (lp.exp() + ent).sum(),
                                         vocab_size=150, chunk_size=16,
                                         misses=misses)[0].backward()

    counter = count_host_syncs(both)
    assert counter.count == 0, counter.by_site()
    assert misses.item() == 0


def _steps_rank(item_in_loss: bool):
    """Host round trips of one training step (after a warm-up step) at 2 and 8
    micro-batches of the same 16 sequences; with ``item_in_loss`` the loss reads one value
    back per micro-batch (the fault this test exists to catch)."""
    import srft_mcore.algo.losses as losses
    from srft_mcore.config import load_config
    from srft_mcore.training.trainer import Trainer
    from test_train_step import _synthetic_step

    if item_in_loss:
        real = losses.srft_loss

        def srft_loss_with_item(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            loss.detach().item()
            return loss, metrics

        losses.srft_loss = srft_loss_with_item
    out = {}
    for mbs in (8, 2):  # 16 sequences: 2 and 8 micro-batches
        cfg = load_config(None, ["train.prompts_per_step=4", "rollout.n_samples=3",
                                 "data.max_response_len=16", f"train.micro_batch_size={mbs}",
                                 "train.mini_batches=1", "logging.tensorboard=false"])
        trainer = Trainer(cfg).init_policy()
        seqs = _synthetic_step(trainer.hf["vocab_size"])
        trainer.train_on(seqs)  # warm-up: optimizer state, lazy initialisation
        # this file too: the negative control's .item() is made here
        counter = count_host_syncs(lambda: trainer.train_on(seqs), PROJECT + (__file__,))
        out[16 // mbs] = {"count": counter.count, "by_site": counter.by_site()}
    return out


@pytest.mark.slow
def test_step_round_trips_do_not_grow_with_micro_batches():
    """The same count for 2 and 8 micro-batches (and a small one: the step's metrics, the
    finite-gradient check, the optimizer's norm and learning rate); the negative control with
    one ``.item()`` in the loss differs by the same whole number k of round trips for each
    of the 6 added micro-batches (k = how often a micro-batch evaluates the loss: with the
    loss in the kernel, once per chunk, once at its end, once for the metrics)."""
    clean, faulty = spawn_ranks(_steps_rank, 1, (False,), timeout_s=300)[0], \
        spawn_ranks(_steps_rank, 1, (True,), timeout_s=300)[0]
    assert clean[2]["by_site"] == clean[8]["by_site"], (clean[2], clean[8])
    assert clean[2]["count"] > 0  # the counter is live: the step's own read-backs
    # the fault: k extra round trips per micro-batch
    per_micro_batch = (faulty[8]["count"] - clean[8]["count"]) / 8
    assert per_micro_batch >= 1 and per_micro_batch == int(per_micro_batch), (clean, faulty)
    assert faulty[8]["count"] - faulty[2]["count"] == 6 * per_micro_batch, (faulty[2], faulty[8])
