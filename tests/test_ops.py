"""Fused vocab-parallel log-prob + entropy against a plain full-vocabulary reference."""
import pytest
import torch

from srft_mcore.ops import (
    linear_vocab_parallel_logprob_entropy,
    linear_vocab_parallel_token_loss,
    reference_logprob_entropy,
    vocab_parallel_logprob_entropy,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _problem(n_tok=37, vocab=290, padded=320, hidden=16, dtype=torch.float32, seed=0,
             device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden_th = torch.randn(n_tok, hidden, generator=g)
    weight_vh = torch.randn(padded, hidden, generator=g) * 0.7
    targets_t = torch.randint(0, vocab, (n_tok,), generator=g)
    g_lp = torch.randn(n_tok, generator=g)
    g_h = torch.randn(n_tok, generator=g)
    to = dict(dtype=dtype, device=device)
    return (hidden_th.to(**to), weight_vh.to(**to), targets_t.to(device), g_lp.to(device),
            g_h.to(device))


def _run_logits(fn, logits_tv, g_lp, g_h):
    """(logp, entropy, d/dlogits) of sum(g_lp * logp + g_h * entropy)."""
    z = logits_tv.detach().clone().requires_grad_()
    logp, ent = fn(z)
    (logp.float() * g_lp + ent.float() * g_h).sum().backward()
    return [x.detach().float() for x in (logp, ent, z.grad)]


def _run_linear(fn, hidden_th, weight_vh, g_lp, g_h):
    """(logp, entropy, d/dhidden, d/dweight) of sum(g_lp * logp + g_h * entropy)."""
    h = hidden_th.detach().clone().requires_grad_()
    w = weight_vh.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    (logp.float() * g_lp + ent.float() * g_h).sum().backward()
    return [x.detach().float() for x in (logp, ent, h.grad, w.grad)]


def _run_token_loss(hidden_th, weight_vh, targets_t, g_lp, g_h, **kw):
    """The same loss formed inside the kernel (its gradient built in the forward)."""
    h = hidden_th.detach().clone().requires_grad_()
    w = weight_vh.detach().clone().requires_grad_()
    loss, logp, ent = linear_vocab_parallel_token_loss(
        h, w, targets_t, lambda lp, e: (lp * g_lp + e * g_h).sum(), **kw)
    assert not logp.requires_grad and not ent.requires_grad
    loss.backward()
    return [x.detach().float() for x in (logp, ent, h.grad, w.grad)]


def _references(hidden_th, weight_vh, targets_t, g_lp, g_h, vocab, temperature=1.0):
    """Full-vocabulary fp32 references on the logits the model produces (hidden @ weight.T
    in the input dtype, as Megatron's output layer). The linear references chain d/dlogits
    through that matmul in fp32."""
    logits = hidden_th @ weight_vh.t()
    ref = lambda z: reference_logprob_entropy(z, targets_t, vocab, temperature)  # noqa: E731
    logp, ent, g_logits = _run_logits(ref, logits.float(), g_lp, g_h)
    by_linear = [logp, ent, g_logits @ weight_vh.float(), g_logits.t() @ hidden_th.float()]
    return logits, [logp, ent, g_logits], by_linear


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _check_all(dtype, device="cpu", temperature=1.0):
    vocab = 290
    h, w, tg, g_lp, g_h = _problem(dtype=dtype, device=device)
    logits, ref_logits, ref_linear = _references(h, w, tg, g_lp, g_h, vocab, temperature)
    kw = dict(vocab_size=vocab, temperature=temperature)
    chunked = _run_logits(lambda z: vocab_parallel_logprob_entropy(z, tg, chunk_size=5, **kw),
                          logits, g_lp, g_h)
    fused = _run_linear(lambda hh, ww: linear_vocab_parallel_logprob_entropy(
        hh, ww, tg, chunk_size=7, **kw), h, w, g_lp, g_h)
    in_kernel = _run_token_loss(h, w, tg, g_lp, g_h, chunk_size=7, **kw)
    linear_names = ("logp", "entropy", "grad_hidden", "grad_weight")
    for got, ref, names in ((chunked, ref_logits, ("logp", "entropy", "grad_logits")),
                            (fused, ref_linear, linear_names),
                            (in_kernel, ref_linear, linear_names)):
        for name, a, b in zip(names, got, ref):
            assert _max_rel(a, b) <= TOL[dtype], (name, _max_rel(a, b))
    assert fused[3][vocab:].abs().max().item() == 0.0  # padded rows get no gradient
    assert in_kernel[3][vocab:].abs().max().item() == 0.0
    assert chunked[2][:, vocab:].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tp1_matches_reference(dtype, temperature):
    _check_all(dtype, temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_cpu_blocks_match_reference(dtype, monkeypatch):
    """Many vocabulary blocks per chunk (partial last block, targets in every block) and
    default chunking with a small budget give the same results as one block."""
    from srft_mcore.ops import logprob_entropy

    monkeypatch.setattr(logprob_entropy, "CPU_BLOCK_ELEMS", 64)
    _check_all(dtype, temperature=0.7)
    monkeypatch.setattr(logprob_entropy, "DEFAULT_CHUNK_BYTES", 3 * 320 * 4)
    monkeypatch.setattr(logprob_entropy, "CPU_CHUNK_SCALE", 3)
    # at most 9 tokens a chunk (budget x CPU_CHUNK_SCALE 3): 5 chunks of 8, the last of 5
    assert logprob_entropy._chunk_len(None, 320, 37, torch.device("cpu")) == 8
    vocab = 290
    h, w, tg, g_lp, g_h = _problem(dtype=dtype)
    _, ref_logits, ref_linear = _references(h, w, tg, g_lp, g_h, vocab)
    fused = _run_linear(lambda hh, ww: linear_vocab_parallel_logprob_entropy(
        hh, ww, tg, vocab_size=vocab), h, w, g_lp, g_h)
    chunked = _run_logits(lambda z: vocab_parallel_logprob_entropy(z, tg, vocab_size=vocab),
                          h @ w.t(), g_lp, g_h)
    for got, ref in ((fused, ref_linear), (chunked, ref_logits)):
        for a, b in zip(got, ref):
            assert _max_rel(a, b) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_logits_any_budget_match_reference(dtype, monkeypatch):
    """The linear kernel's kept tail (none, the default, part of a chunk, every token) changes nothing but which logits are recomputed; a call without
    gradient keeps none."""
    from srft_mcore.ops import logprob_entropy

    vocab = 290
    h, w, tg, g_lp, g_h = _problem(dtype=dtype)
    _, _, ref_linear = _references(h, w, tg, g_lp, g_h, vocab)
    per_tok = 320 * (4 if dtype == torch.float32 else 6)
    # default: the fp32 weight gradient's bytes, 4 * 320 * 16 (bf16 logits also keep a
    # bf16 copy: 6 bytes a value)
    default = 16 if dtype == torch.float32 else 10
    for keep, tail in ((0, 0), (None, default), (5 * per_tok + 3, 5), (10**9, 37)):
        assert logprob_entropy._keep_len(keep, 37, 320, 16, dtype) == tail
        fused = _run_linear(lambda hh, ww: linear_vocab_parallel_logprob_entropy(
            hh, ww, tg, vocab_size=vocab, chunk_size=7, keep_bytes=keep), h, w, g_lp, g_h)
        for a, b in zip(fused, ref_linear):
            assert _max_rel(a, b) <= TOL[dtype], (keep, _max_rel(a, b))
    seen = []
    monkeypatch.setattr(logprob_entropy, "_spans",
                        lambda *a, _f=logprob_entropy._spans: seen.append(a[3]) or _f(*a))
    with torch.no_grad():
        linear_vocab_parallel_logprob_entropy(h, w.requires_grad_(), tg, vocab_size=vocab)
    linear_vocab_parallel_logprob_entropy(h, w.detach(), tg, vocab_size=vocab)
    assert seen == [0, 0]
    with pytest.raises(ValueError, match="keep_bytes"):
        linear_vocab_parallel_logprob_entropy(h, w, tg, keep_bytes=-1)


def test_loss_in_kernel_nonlinear_and_not_separable_losses(monkeypatch):
    """A nonlinear per-token loss (a clipped ratio, entropy weights detached, an entropy
    term) formed in the kernel equals autograd through the plain kernel, on the fast path
    (no warning). A loss whose token gradients read other tokens still gets the exact
    gradient, by the second pass, and says so; a loss that is not a scalar is refused."""
    import warnings

    vocab = 290
    h, w, tg, g_lp, g_h = _problem()
    old = -torch.rand(h.shape[0]) * 4

    def clipped(lp, ent):
        r = torch.exp(lp - old)
        return (-torch.minimum(r * g_lp, r.clamp(0.8, 1.2) * g_lp) * torch.exp(-ent.detach())
                + 0.1 * ent * ent).sum()

    def coupled(lp, ent):
        return lp.sum() ** 2 / 100 + ent.mean() * lp.mean()

    for loss_fn, expect_warning in ((clipped, False), (coupled, True)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = linear_vocab_parallel_logprob_entropy(hh, ww, tg, vocab_size=vocab,
                                                        chunk_size=7)
        loss_fn(lp, ent).backward()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            from srft_mcore.ops import logprob_entropy
            logprob_entropy._NOT_SEPARABLE_WARNED.clear()
            loss, lp2, ent2 = linear_vocab_parallel_token_loss(h2, w2, tg, loss_fn,
                                                               vocab_size=vocab, chunk_size=7)
        (3 * loss).backward()
        assert any("not a sum of per-token terms" in str(x.message) for x in seen) \
            == expect_warning
        assert loss.item() == pytest.approx(loss_fn(lp, ent).item(), rel=1e-6)
        assert _max_rel(lp2, lp.detach()) <= 1e-6 and _max_rel(ent2, ent.detach()) <= 1e-6
        assert _max_rel(h2.grad, 3 * hh.grad) <= 1e-5
        assert _max_rel(w2.grad, 3 * ww.grad) <= 1e-5
    with pytest.raises(ValueError, match="scalar"):
        linear_vocab_parallel_token_loss(h, w, tg, lambda lp, e: lp * 2, vocab_size=vocab)
    # default chunks hold at least the plain kernel's kept-tail budget (min(T, h) = 16 of 37
    # tokens here, with the plain default chunk made 3 tokens): 3 chunks, so the loss is
    # evaluated 3 + 1 times
    from srft_mcore.ops import logprob_entropy

    monkeypatch.setattr(logprob_entropy, "DEFAULT_CHUNK_BYTES", 4 * 320)
    seen = []
    linear_vocab_parallel_token_loss(h, w.requires_grad_(), tg, lambda lp, e: seen.append(
        lp.shape) or lp.sum(), vocab_size=vocab)
    assert len(seen) == 4 and seen[0] == (37,)


def test_running_max_raised_by_later_blocks(monkeypatch):
    """Logits that grow block after block (each raises the running max by far more than
    exp can hold) give the reference's values, with no overflow."""
    from srft_mcore.ops import logprob_entropy

    monkeypatch.setattr(logprob_entropy, "CPU_BLOCK_ELEMS", 64)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 300, generator=g) + torch.arange(300).float().div(8).floor() * 120
    tg = torch.randint(0, 300, (6,), generator=g)
    for t in (1.0, 0.5):
        lp, ent = vocab_parallel_logprob_entropy(logits, tg, temperature=t)
        ref_lp, ref_ent = reference_logprob_entropy(logits, tg, temperature=t)
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
        assert torch.allclose(lp, ref_lp, atol=1e-3) and torch.allclose(ent, ref_ent, atol=1e-4)
    # masked (-inf) logits filling the first blocks: the log-probs stay right
    masked = torch.randn(6, 300, generator=g)
    masked[:, :100] = float("-inf")
    tg = torch.randint(100, 300, (6,), generator=g)
    lp, _ = vocab_parallel_logprob_entropy(masked, tg)
    assert torch.allclose(lp, reference_logprob_entropy(masked, tg)[0], atol=1e-5)


def test_padding_is_excluded():
    h, w, tg, _, _ = _problem()
    logits = h @ w.t()
    logits[:, 290:] = 30.0  # huge padded logits must not change anything
    logp, ent = vocab_parallel_logprob_entropy(logits, tg, vocab_size=290)
    ref_lp, ref_ent = reference_logprob_entropy(logits[:, :290], tg)
    assert torch.allclose(logp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    # without vocab_size the padded columns do count
    logp_all, _ = vocab_parallel_logprob_entropy(logits, tg)
    assert (logp_all - ref_lp).abs().max() > 1.0


def test_inputs_untouched_chunking_invariant_and_shapes():
    h, w, tg, _, _ = _problem()
    logits = (h @ w.t()).requires_grad_()
    before = logits.detach().clone()
    outs = [vocab_parallel_logprob_entropy(logits.view(1, 37, -1), tg.view(1, 37),
                                           vocab_size=290, chunk_size=c) for c in (1, 8, None)]
    assert outs[0][0].shape == (1, 37) and outs[0][1].dtype == torch.float32
    for lp, ent in outs[1:]:
        assert torch.allclose(lp, outs[0][0], atol=1e-6)
        assert torch.allclose(ent, outs[0][1], atol=1e-6)
    sum(lp.sum() + ent.sum() for lp, ent in outs).backward()
    assert torch.equal(logits.detach(), before)


def test_entropy_grad_stop_and_single_output_grads():
    h, w, tg, g_lp, _ = _problem()
    for fn in (lambda hh, ww, **k: vocab_parallel_logprob_entropy(hh @ ww.t(), tg, **k),
               lambda hh, ww, **k: linear_vocab_parallel_logprob_entropy(hh, ww, tg, **k)):
        hh = h.clone().requires_grad_()
        lp, ent = fn(hh, w, vocab_size=290, entropy_grad=False)
        assert not ent.requires_grad and lp.requires_grad
        (lp * g_lp).sum().backward()
        href = h.clone().requires_grad_()
        rlp, _ = reference_logprob_entropy(href @ w.t(), tg, 290)
        (rlp * g_lp).sum().backward()
        assert _max_rel(hh.grad, href.grad) < 1e-5
        # entropy alone
        hh.grad = None
        href.grad = None
        _, ent = fn(hh, w, vocab_size=290)
        ent.sum().backward()
        _, rent = reference_logprob_entropy(href @ w.t(), tg, 290)
        rent.sum().backward()
        assert _max_rel(hh.grad, href.grad) < 1e-5


def test_entropy_of_uniform_and_one_hot():
    logits = torch.zeros(2, 8)
    logits[1, 3] = 1e4
    lp, ent = vocab_parallel_logprob_entropy(logits, torch.tensor([0, 3]))
    assert torch.allclose(ent, torch.tensor([torch.log(torch.tensor(8.0)).item(), 0.0]),
                          atol=1e-6)
    assert torch.allclose(lp, torch.tensor([-torch.log(torch.tensor(8.0)).item(), 0.0]),
                          atol=1e-6)


# --------------------------------------------------------------------------- TP2, gloo
def _tp_rank(dtype_name: str, vocab: int, padded: int, temperature: float):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, dtype_name)
    h, w, tg, g_lp, g_h = _problem(vocab=vocab, padded=padded, dtype=dtype)
    logits, ref_logits, ref_linear = _references(h, w, tg, g_lp, g_h, vocab, temperature)
    v_local = padded // world
    shard = slice(rank * v_local, (rank + 1) * v_local)
    kw = dict(vocab_size=vocab, tp_group=dist.group.WORLD, temperature=temperature)
    chunked = _run_logits(lambda z: vocab_parallel_logprob_entropy(z, tg, chunk_size=6, **kw),
                          logits[:, shard], g_lp, g_h)
    fused = _run_linear(lambda hh, ww: linear_vocab_parallel_logprob_entropy(
        hh, ww, tg, chunk_size=9, **kw), h, w[shard], g_lp, g_h)
    # default chunking (made small here): the ranks hold different numbers of real columns
    # but must still agree on the chunk count, or their collectives mismatch
    from srft_mcore.ops import logprob_entropy

    logprob_entropy.DEFAULT_CHUNK_BYTES = 4 * v_local * 4
    kw_default = dict(kw, chunk_size=None)
    chunked_default = _run_logits(lambda z: vocab_parallel_logprob_entropy(z, tg, **kw_default),
                                  logits[:, shard], g_lp, g_h)
    fused_default = _run_linear(lambda hh, ww: linear_vocab_parallel_logprob_entropy(
        hh, ww, tg, **kw_default), h, w[shard], g_lp, g_h)
    in_kernel = _run_token_loss(h, w[shard], tg, g_lp, g_h, **kw_default)
    want_chunked = [ref_logits[0], ref_logits[1], ref_logits[2][:, shard]]
    want_fused = [ref_linear[0], ref_linear[1], ref_linear[2], ref_linear[3][shard]]
    return {kind: [_max_rel(a, b) for a, b in zip(got, want)] for kind, got, want in (
        ("chunked", chunked, want_chunked), ("fused", fused, want_fused),
        ("chunked_default", chunked_default, want_chunked),
        ("fused_default", fused_default, want_fused), ("in_kernel", in_kernel, want_fused))}


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_tp2_matches_reference(dtype_name):
    from srft_mcore.launching.local import spawn_ranks

    tol = TOL[getattr(torch, dtype_name)]
    # 290 of 320: rank 1 holds 130 real columns; 150 of 320: rank 1 holds none
    for vocab, temperature in ((290, 1.0), (150, 0.7)):
        for rank_out in spawn_ranks(_tp_rank, 2, (dtype_name, vocab, 320, temperature),
                                    timeout_s=120):
            for kind, diffs in rank_out.items():
                assert max(diffs) <= tol, (vocab, kind, diffs)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    _check_all(dtype, device="cuda", temperature=0.7)
