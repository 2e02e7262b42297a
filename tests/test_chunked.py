"""Chunked log-prob gathering and the chunked full-vocabulary KL vs the plain full-vocab fp32/fp64 computation:
values, extras and gradients, finite-difference gradient checks, a real transformers Qwen3 model with tied
embeddings, and the memory bound measured with torch's profiler (CPU allocator events). No mocks."""

from __future__ import annotations

import pytest
import torch

from student_trainer.opd.chunked import full_vocab_reverse_kl, gather_logprobs, head_logits
from student_trainer.opd.losses import TEACHER_LOGPROB_FLOOR

N, H, V = 13, 6, 37


def _setup(dtype=torch.float64, bias=True, seed=0, n=N, h=H, v=V):
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, v, bias=bias).to(dtype)
    hidden = (torch.randn(n, h, dtype=dtype) * 2).requires_grad_(True)
    return head, hidden


def _params(head, hidden):
    return [hidden, head.weight] + ([head.bias] if head.bias is not None else [])


def _grads(out, upstream, params):
    return torch.autograd.grad((out * upstream).sum(), params)


# ---------------------------------------------------------------------------------------- gather


@pytest.mark.parametrize("method", ["recompute", "checkpoint"])
@pytest.mark.parametrize(
    "chunk_rows,bias,temperature", [(1, True, 1.0), (4, False, 1.0), (5, True, 0.7), (100, True, 1.0)]
)
def test_gather_matches_full_log_softmax(method, chunk_rows, bias, temperature):
    head, hidden = _setup(bias=bias)
    ids = torch.randint(0, V, (N, 5))
    ids[:, 4] = ids[:, 0]  # duplicates must add up in the gradient
    out = gather_logprobs(
        hidden,
        head,
        ids,
        top_k=3,
        want_entropy=True,
        temperature=temperature,
        chunk_rows=chunk_rows,
        method=method,
    )
    logp = torch.log_softmax(head(hidden) / temperature, dim=-1)  # the plain full-vocab reference
    ref = logp.gather(1, ids)
    torch.testing.assert_close(out.logprobs_N_M, ref)
    torch.testing.assert_close(out.entropy_N, -(logp.exp() * logp).sum(-1).detach())
    top = logp.detach().topk(3, dim=-1)
    torch.testing.assert_close(out.topk_logprobs_N_k, top.values)
    assert torch.equal(out.topk_ids_N_k, top.indices)
    upstream = torch.randn(N, 5, dtype=torch.float64)
    for got, want in zip(
        _grads(out.logprobs_N_M, upstream, _params(head, hidden)),
        _grads(ref, upstream, _params(head, hidden)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def _linear_of(w: torch.Tensor, b: torch.Tensor) -> torch.nn.Linear:
    """An nn.Linear whose weight and bias are the given tensors (not copies), so gradcheck can perturb them."""
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    del lin.weight, lin.bias
    lin.weight, lin.bias = w, b
    return lin


def _leaf_copies(head):
    return [p.detach().clone().requires_grad_(True) for p in (head.weight, head.bias)]


def test_gather_gradcheck_float64():
    head, hidden = _setup(n=5, h=3, v=7)
    ids = torch.tensor([[0, 6], [1, 1], [2, 5], [3, 4], [6, 0]])

    def fn(h, w, b):
        return gather_logprobs(h, _linear_of(w, b), ids, chunk_rows=2).logprobs_N_M

    assert torch.autograd.gradcheck(fn, (hidden, *_leaf_copies(head)))


def test_gather_bf16_and_cpu_autocast_follow_the_plain_forward():
    """bf16 weights (GPU style) and fp32 weights under bf16 autocast: same numbers as the plain head(h).float()."""
    head, hidden = _setup(dtype=torch.float32, n=40, h=32, v=300)
    ids = torch.randint(0, 300, (40, 3))
    bf_head = torch.nn.Linear(32, 300).to(torch.bfloat16)
    bf_head.load_state_dict(head.state_dict())
    bf_hidden = hidden.detach().to(torch.bfloat16).requires_grad_(True)
    out = gather_logprobs(bf_hidden, bf_head, ids, chunk_rows=7)
    ref = torch.log_softmax(bf_head(bf_hidden).float(), -1).gather(1, ids)
    torch.testing.assert_close(out.logprobs_N_M, ref, atol=2e-2, rtol=0)
    (g_h,) = torch.autograd.grad(out.logprobs_N_M.sum(), bf_hidden)
    (r_h,) = torch.autograd.grad(ref.sum(), bf_hidden)
    assert g_h.dtype == torch.bfloat16
    torch.testing.assert_close(g_h.float(), r_h.float(), atol=5e-2, rtol=5e-2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gather_logprobs(hidden, head, ids, chunk_rows=7)
        ref = torch.log_softmax(head(hidden).float(), -1).gather(1, ids)
    got = torch.autograd.grad(out.logprobs_N_M.sum(), [hidden, head.weight, head.bias])
    want = torch.autograd.grad(ref.sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(out.logprobs_N_M, ref, atol=2e-2, rtol=0)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32  # fp32 master weights get fp32 gradients, as with plain autocast
        torch.testing.assert_close(g, w, atol=5e-2, rtol=5e-2)


def test_gather_on_a_real_qwen3_with_tied_embeddings():
    """Gradients reach every parameter of a real transformers model exactly as through its own logits."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, initializer_range=0.2,
    )  # fmt: skip
    model = Qwen3ForCausalLM(cfg).double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (18, 2))

    ref = torch.log_softmax(model(input_ids).logits.reshape(18, 97), -1).gather(1, targets)
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    hidden = model.model(input_ids).last_hidden_state.reshape(18, 32)
    out = gather_logprobs(hidden, model.lm_head, targets, chunk_rows=5)
    got_grads = torch.autograd.grad(out.logprobs_N_M.sum(), list(model.parameters()))
    torch.testing.assert_close(out.logprobs_N_M, ref)
    for g, w in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_losses_through_the_chunked_gather_equal_the_naive_path():
    """The trainer's path (one chunked gather over [y, S], then the loss) vs full log_softmax, fp64."""
    from student_trainer.opd.losses import sampled_token_loss, student_topk_loss, teacher_topk_tail_loss

    head, hidden = _setup(n=20, v=50)
    t_head, t_hidden = _teacher(n=20, v=50)
    lq = torch.log_softmax(t_head(t_hidden), -1).detach()
    with torch.no_grad():  # the rollout pass: stored student top-k and sampled ids
        rollout = gather_logprobs(hidden, head, torch.zeros(20, 1, dtype=torch.long), top_k=4)
    s_ids, y = rollout.topk_ids_N_k, torch.randint(0, 50, (20,))
    t_ids = lq.topk(4, -1).indices
    mask = torch.arange(20) % 7 != 3

    def losses(lp_y, lp_s, lp_t):
        return [
            sampled_token_loss(lp_y, lq.gather(1, y[:, None]).squeeze(1), mask),
            student_topk_loss(lp_s, lq.gather(1, s_ids), mask),
            student_topk_loss(lp_s, lq.gather(1, s_ids), mask, mode="direct"),
            teacher_topk_tail_loss(lp_t, lq.gather(1, t_ids), mask),
        ]

    out = gather_logprobs(hidden, head, torch.cat([y[:, None], s_ids, t_ids], 1), chunk_rows=6).logprobs_N_M
    logp = torch.log_softmax(head(hidden), -1)
    chunked = losses(out[:, 0], out[:, 1:5], out[:, 5:])
    naive = losses(logp.gather(1, y[:, None]).squeeze(1), logp.gather(1, s_ids), logp.gather(1, t_ids))
    for c, r in zip(chunked, naive, strict=True):
        torch.testing.assert_close(c, r)
        got = torch.autograd.grad(c, _params(head, hidden), retain_graph=True)
        want = torch.autograd.grad(r, _params(head, hidden), retain_graph=True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
            assert g.abs().sum() > 0


def test_gather_empty_batch_and_bad_inputs():
    head, hidden = _setup()
    for method in ("recompute", "checkpoint"):
        out = gather_logprobs(hidden[:0], head, torch.zeros(0, 2, dtype=torch.long), top_k=2, method=method)
        assert out.logprobs_N_M.shape == (0, 2) and out.topk_ids_N_k.shape == (0, 2)
    with pytest.raises(ValueError, match=r"ids_N_M must lie in \[0, 37\).*max 37"):
        gather_logprobs(hidden, head, torch.full((N, 1), V))
    with pytest.raises(ValueError, match=r"ids_N_M must have 2 dims and 13 rows, got shape \(12, 1\)"):
        gather_logprobs(hidden, head, torch.zeros(12, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        gather_logprobs(hidden, head, torch.zeros(N, 1, dtype=torch.long), chunk_rows=0)
    with pytest.raises(ValueError, match="top_k must be in 0..V=37, got 38"):
        gather_logprobs(hidden, head, torch.zeros(N, 1, dtype=torch.long), top_k=38)


# -------------------------------------------------------------------------------------- full KL


def _teacher(n=N, v=V, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t_head = torch.nn.Linear(5, v).to(dtype)
    t_hidden = torch.randn(n, 5, generator=g, dtype=dtype) * 2
    return t_head, t_hidden


def _brute_kl(student_logits, teacher_logits):
    lp, lq = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (lp.exp() * (lp - lq)).sum(-1), lp, lq


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_full_vocab_kl_matches_brute_force(chunk_rows):
    head, hidden = _setup()
    t_head, t_hidden = _teacher()
    y = torch.randint(0, V, (N,))
    out = full_vocab_reverse_kl(
        hidden, head, head_logits(t_hidden, t_head), sample_ids_N=y, top_k=4, chunk_rows=chunk_rows
    )
    kl, lp, lq = _brute_kl(head(hidden), t_head(t_hidden).detach())
    torch.testing.assert_close(out.kl_N, kl)
    torch.testing.assert_close(out.student_entropy_N, -(lp.exp() * lp).sum(-1).detach())
    torch.testing.assert_close(out.teacher_entropy_N, -(lq.exp() * lq).sum(-1))
    torch.testing.assert_close(out.student_logprob_N, lp.gather(1, y[:, None]).squeeze(1).detach())
    torch.testing.assert_close(out.teacher_logprob_N, lq.gather(1, y[:, None]).squeeze(1))
    assert torch.equal(out.student_topk_ids_N_k, lp.topk(4).indices)
    assert torch.equal(out.teacher_topk_ids_N_k, lq.topk(4).indices)
    torch.testing.assert_close(out.teacher_topk_logprobs_N_k, lq.topk(4).values)
    upstream = torch.rand(N, dtype=torch.float64)
    for got, want in zip(
        _grads(out.kl_N, upstream, _params(head, hidden)),
        _grads(kl, upstream, _params(head, hidden)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    assert not t_head.weight.requires_grad or t_head.weight.grad is None  # the teacher gets no gradient


def test_full_vocab_kl_gradcheck_float64():
    head, hidden = _setup(n=5, h=3, v=7)
    t_head, t_hidden = _teacher(n=5, v=7)

    def fn(h, w, b):
        return full_vocab_reverse_kl(h, _linear_of(w, b), head_logits(t_hidden, t_head), chunk_rows=2).kl_N

    assert torch.autograd.gradcheck(fn, (hidden, *_leaf_copies(head)))


def test_full_vocab_kl_student_equals_teacher_is_zero_with_zero_gradient():
    head, hidden = _setup()
    out = full_vocab_reverse_kl(hidden, head, head_logits(hidden.detach(), head), chunk_rows=4)
    assert out.kl_N.abs().max().item() < 1e-12
    for g in torch.autograd.grad(out.kl_N.sum(), _params(head, hidden)):
        assert g.abs().max().item() < 1e-12


def test_full_vocab_kl_padded_vocabularies_compare_the_shared_ids_only():
    """Student config pads to V + 2 rows, teacher to V + 5 (same tokenizer of V ids): vocab_size=V."""
    head, hidden = _setup(v=V + 2)
    t_head, t_hidden = _teacher(v=V + 5)
    with pytest.raises(ValueError, match="teacher logits have 42 columns but the student head has 39 rows"):
        full_vocab_reverse_kl(hidden, head, head_logits(t_hidden, t_head), chunk_rows=4)
    with pytest.raises(ValueError, match=r"teacher_logits\(0, 4\) must return \(4, >= 37\), got \(4, 30\)"):
        full_vocab_reverse_kl(
            hidden, head, lambda s, e: t_head(t_hidden[s:e])[:, :30], vocab_size=V, chunk_rows=4
        )
    out = full_vocab_reverse_kl(hidden, head, head_logits(t_hidden, t_head), vocab_size=V, chunk_rows=4)
    kl, _, _ = _brute_kl(head(hidden)[:, :V], t_head(t_hidden)[:, :V].detach())
    torch.testing.assert_close(out.kl_N, kl)
    (g_w,) = torch.autograd.grad(out.kl_N.sum(), head.weight)
    assert torch.equal(g_w[V:], torch.zeros_like(g_w[V:]))  # padded rows: no gradient
    (r_w,) = torch.autograd.grad(kl.sum(), head.weight)
    torch.testing.assert_close(g_w, r_w)


def test_full_vocab_kl_teacher_zero_probabilities_are_floored():
    head, hidden = _setup()
    t_head, t_hidden = _teacher()
    t_logits = t_head(t_hidden).detach()
    t_logits[:, :3] = float("-inf")  # the teacher forbids three ids (e.g. suppressed tokens)
    out = full_vocab_reverse_kl(hidden, head, lambda s, e: t_logits[s:e], chunk_rows=4)
    assert torch.isfinite(t_logits[:, 3:]).all() and torch.isinf(t_logits[:, :3]).all()  # input untouched
    lp = torch.log_softmax(head(hidden), -1)
    lq = torch.log_softmax(t_logits, -1).clamp_min(TEACHER_LOGPROB_FLOOR)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(out.kl_N, ref)
    grads = torch.autograd.grad(out.kl_N.sum(), _params(head, hidden))
    want = torch.autograd.grad(ref.sum(), _params(head, hidden))
    for g, w in zip(grads, want, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w)
    assert torch.isfinite(out.teacher_entropy_N).all()


# ------------------------------------------------------------------------------------------ memory


def _peak_cpu_bytes(fn, leaves: list[torch.Tensor]) -> int:
    """Peak of live torch CPU allocations during fn(), from the profiler's allocation/free events.

    Gradients are cleared first: freeing or accumulating into an existing .grad would hide its allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    for t in leaves:
        t.grad = None

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def test_peak_memory_is_bounded_by_the_chunk_not_the_batch():
    n, h, v, chunk = 512, 16, 8192, 32
    head, hidden = _setup(dtype=torch.float32, n=n, h=h, v=v, bias=False)
    t_head, t_hidden = _teacher(n=n, v=v, dtype=torch.float32)
    ids = torch.randint(0, v, (n, 17))
    full = n * v * 4  # one fp32 [N, V] tensor: 16 MiB
    chunk_bytes = chunk * v * 4  # one fp32 [chunk, V] tensor: 1 MiB
    weight_grad = v * h * 4  # the head's gradient, which any backward allocates: 0.5 MiB

    def chunked_gather():
        lp = gather_logprobs(hidden, head, ids, want_entropy=True, chunk_rows=chunk).logprobs_N_M
        lp.sum().backward()

    def naive_gather():
        torch.log_softmax(head(hidden).float(), -1).gather(1, ids).sum().backward()

    def chunked_kl():
        full_vocab_reverse_kl(
            hidden, head, head_logits(t_hidden, t_head), chunk_rows=chunk
        ).kl_N.sum().backward()

    chunked, naive, kl = (
        _peak_cpu_bytes(chunked_gather, [head.weight, hidden]),
        _peak_cpu_bytes(naive_gather, [head.weight, hidden]),
        _peak_cpu_bytes(chunked_kl, [head.weight, hidden]),
    )
    print(f"peak bytes: naive {naive}, chunked gather {chunked}, chunked KL {kl}; one chunk {chunk_bytes}")
    # measured with torch 2.13: naive 3 full [N, V] buffers; gather 2 chunk buffers; KL 3 chunk buffers
    assert naive >= 2 * full  # logits + log_softmax output at least
    assert chunked <= 2 * chunk_bytes + weight_grad + 64 * 1024, (chunked, chunk_bytes)
    assert kl <= 3 * chunk_bytes + weight_grad + 64 * 1024, (kl, chunk_bytes)
