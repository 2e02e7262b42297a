"""Memory-safe student log-probs from final hidden states, computed a chunk of rows at a time.

The ``[N, V]`` logits of a micro-batch (V = 151,936 for Qwen) are never materialised whole in fp32: the
output layer is applied to ``chunk_rows`` rows at a time, in the forward AND in the backward pass (a custom
``autograd.Function`` saves only the per-row log-normaliser and recomputes the chunk's logits when the
gradient is needed), so the extra memory is O(chunk_rows * V) whatever N is, plus the head's weight gradient.

API (what the training loop calls)
----------------------------------
``gather_logprobs(hidden_N_H, head, ids_N_M, top_k=0, want_entropy=False, temperature=1.0,
vocab_size=None) -> GatheredLogprobs``
    The student's log-probs at M ids per row, log_softmax(logits / temperature) normalised over the first
    ``vocab_size`` ids (the tokenizer's; default every row of the head), differentiable w.r.t. the hidden
    states and the head. ``.logprobs_N_M`` carries the gradient; ``.entropy_N``, ``.topk_ids_N_k``
    and ``.topk_logprobs_N_k`` are extras without gradient (metrics; the rollout pass's stored top-k).
``full_vocab_reverse_kl(hidden_N_H, head, teacher_logits) -> FullVocabKL``
    Exact KL(p || q) per row over the whole vocabulary against an in-process teacher, differentiable w.r.t.
    the student only. ``teacher_logits(start, stop)`` returns the teacher's logits of rows start..stop;
    ``head_logits(teacher_hidden_N_H, teacher_head)`` builds it from the teacher's final hidden states. It is
    called twice per chunk (forward and backward) so that no teacher chunk is kept alive.

Typical use (one forward over the sampled ids and the stored student top-k ids)::

    ids_N_M = torch.cat([sampled_N[:, None], stored_topk_ids_N_K], dim=1)
    out = gather_logprobs(hidden_N_H, model.lm_head, ids_N_M, want_entropy=True)
    logp_y_N, logp_S_N_K = out.logprobs_N_M[:, 0], out.logprobs_N_M[:, 1:]

Precision: the head runs in the compute dtype (the autocast dtype when autocast is on, else the dtype of the
hidden states and weight: bf16 on GPU, fp32 on CPU), like Hugging Face's forward; everything after the
matmul is fp32. The head's weight gradient is accumulated over chunks in fp32.

``method="checkpoint"`` (``torch.utils.checkpoint`` per chunk around a plain log_softmax) is kept for
comparison and for heads that are not a plain ``nn.Linear``. It is worse: each chunk's backward through the
head materialises a whole ``[V, H]`` weight-gradient temporary before accumulating it, plus autograd's
log_softmax/gather buffers (measured at V = 151,936: 2x the peak of the default; see
docs/bench_results/loss_memory.md). Under FSDP / ZeRO-3 the head weight must be gathered by the caller:
the default method reads ``head.weight`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from student_trainer.opd.losses import TEACHER_LOGPROB_FLOOR

TeacherLogits = Callable[[int, int], torch.Tensor]
DEFAULT_CHUNK_ROWS = 1024


@dataclass
class GatheredLogprobs:
    """Result of :func:`gather_logprobs` for N rows. Only ``logprobs_N_M`` carries a gradient."""

    logprobs_N_M: torch.Tensor  # (N, M) fp32, full-vocab log-probs at ids_N_M
    entropy_N: torch.Tensor | None  # (N,) fp32 nats, H(p) of the whole distribution; no grad
    topk_ids_N_k: torch.Tensor | None  # (N, k) int64, descending; no grad
    topk_logprobs_N_k: torch.Tensor | None  # (N, k) fp32; no grad


@dataclass
class FullVocabKL:
    """Result of :func:`full_vocab_reverse_kl` for N rows. Only ``kl_N`` carries a gradient."""

    kl_N: torch.Tensor  # (N,) fp32, KL(p || q) over the vocabulary, nats
    student_entropy_N: torch.Tensor  # (N,) fp32
    teacher_entropy_N: torch.Tensor  # (N,) fp32
    student_logprob_N: torch.Tensor | None  # (N,) at sample_ids_N, no grad
    teacher_logprob_N: torch.Tensor | None  # (N,) at sample_ids_N (floored like the loss)
    student_topk_ids_N_k: torch.Tensor | None  # (N, k)
    student_topk_logprobs_N_k: torch.Tensor | None
    teacher_topk_ids_N_k: torch.Tensor | None
    teacher_topk_logprobs_N_k: torch.Tensor | None


# ----------------------------------------------------------------------------------------------- helpers


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Dtype of everything after the matmul: fp32, or fp64 when computing in fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(
    h_C_H: torch.Tensor, w_V_H: torch.Tensor, b_V: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """fp32 logits of one chunk; the matmul runs in the dtype of ``w_V_H``."""
    logits_C_V = F.linear(h_C_H.to(w_V_H.dtype), w_V_H, b_V).to(_acc(w_V_H.dtype))
    if temperature != 1.0:
        logits_C_V = logits_C_V / temperature
    return logits_C_V


def _mask_padded_(logits_C_V: torch.Tensor, vocab: int) -> torch.Tensor:
    """Columns >= ``vocab`` (padded output rows, not tokens) to -inf, in place: out of the normaliser, the
    entropy and the top-k, and p = 0 there, so they get no gradient."""
    if vocab < logits_C_V.shape[1]:
        logits_C_V[:, vocab:] = float("-inf")
    return logits_C_V


def _entropy_from_logprobs_(logp_C_V: torch.Tensor, p_C_V: torch.Tensor) -> torch.Tensor:
    """H = -sum p log p per row, with no extra [C, V] buffer: clamps ``logp_C_V`` (so that p = 0, log p = -inf
    adds 0, not NaN) and overwrites ``p_C_V`` with p * log p. An elementwise sum, not a matmul, so that
    TF32 matmuls on GPU cannot round it."""
    logp_C_V.clamp_(min=torch.finfo(logp_C_V.dtype).min)
    return -p_C_V.mul_(logp_C_V).sum(-1)


def _head_grads_(
    dz_C_V: torch.Tensor,
    h_C_H: torch.Tensor,
    w_V_H: torch.Tensor,
    grads: dict[str, torch.Tensor],
    rows: slice,
) -> None:
    """Back-propagate d loss / d logits of one chunk through ``logits = h @ W.T + b`` into ``grads``."""
    dz = dz_C_V.to(w_V_H.dtype)
    if "hidden" in grads:
        grads["hidden"][rows] = dz @ w_V_H
    if "weight" in grads:
        h = h_C_H.to(w_V_H.dtype)
        if dz.dtype == grads["weight"].dtype:
            grads["weight"].addmm_(dz.T, h)
        else:  # bf16 product (fp32 accumulation inside the matmul), then an fp32 running sum over chunks
            grads["weight"].add_(dz.T @ h)  # in-place add promotes to fp32 without an fp32 [V, H] copy
    if "bias" in grads:
        grads["bias"] += dz_C_V.sum(0)


def _grad_buffers(
    ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    if ctx.needs_input_grad[0]:
        grads["hidden"] = torch.empty_like(hidden)
    if ctx.needs_input_grad[1]:
        grads["weight"] = torch.zeros(weight.shape, dtype=_acc(ctx.cdt), device=weight.device)
    if bias is not None and ctx.needs_input_grad[2]:
        grads["bias"] = torch.zeros(bias.shape, dtype=_acc(ctx.cdt), device=bias.device)
    return grads


def _returned_grads(
    grads: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    gw = grads.get("weight")
    gb = grads.get("bias")
    return (
        grads.get("hidden"),
        None if gw is None else gw.to(weight.dtype),
        None if gb is None or bias is None else gb.to(bias.dtype),
    )


def _check_inputs(hidden_N_H: torch.Tensor, head: torch.nn.Module, chunk_rows: int, top_k: int) -> None:
    if hidden_N_H.dim() != 2:
        raise ValueError(f"hidden_N_H must be 2-D (N, H), got shape {tuple(hidden_N_H.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[1] != hidden_N_H.shape[1]:
        raise ValueError(
            f"head must be a linear layer with weight (V, H={hidden_N_H.shape[1]}), got "
            f"{None if weight is None else tuple(weight.shape)}"
        )
    if not 0 <= top_k <= weight.shape[0]:
        raise ValueError(f"top_k must be in 0..V={weight.shape[0]}, got {top_k}")


def _check_ids(name: str, ids: torch.Tensor, rows: int, vocab: int, dims: int) -> None:
    if ids.dim() != dims or ids.shape[0] != rows:
        raise ValueError(f"{name} must have {dims} dims and {rows} rows, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} must lie in [0, {vocab}) (the vocabulary: vocab_size, else the head's rows), got min "
            f"{int(ids.min())} max {int(ids.max())}"
        )


# ------------------------------------------------------------------------------------- gather log-probs


class _GatherLogprobs(torch.autograd.Function):
    """log p(ids) per row; saves (hidden, weight, bias, ids, lse_N) and recomputes the logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk_rows, temperature, vocab, top_k, want_entropy, sink):
        n, m = ids.shape
        cdt = _compute_dtype(hidden, weight)
        acc = _acc(cdt)
        out = torch.empty(n, m, dtype=acc, device=hidden.device)
        lse_N = torch.empty(n, dtype=acc, device=hidden.device)
        ent_N = torch.empty(n, dtype=acc, device=hidden.device) if want_entropy else None
        topi = torch.empty(n, top_k, dtype=torch.long, device=hidden.device)
        topv = torch.empty(n, top_k, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = _mask_padded_(_chunk_logits(hidden[rows], w, b, temperature), vocab)
                lse = torch.logsumexp(logits, dim=-1)
                lse_N[rows] = lse
                out[rows] = logits.gather(1, ids[rows]) - lse[:, None]
                if top_k:
                    v, i = logits.topk(top_k, dim=-1)
                    topv[rows], topi[rows] = v - lse[:, None], i
                if ent_N is not None:
                    logits.sub_(lse[:, None])  # now log p; the logits are not needed any more
                    ent_N[rows] = _entropy_from_logprobs_(logits, logits.exp())
                del logits  # before the next chunk's matmul, or two chunks' logits would be alive
        ctx.save_for_backward(hidden, weight, bias, ids, lse_N)
        ctx.chunk_rows, ctx.temperature, ctx.cdt, ctx.vocab = chunk_rows, temperature, cdt, vocab
        sink.update(entropy=ent_N, topk_ids=topi if top_k else None, topk_logprobs=topv if top_k else None)
        return out

    @staticmethod
    def backward(ctx, grad_N_M):
        hidden, weight, bias, ids, lse_N = ctx.saved_tensors
        grads = _grad_buffers(ctx, hidden, weight, bias)
        g_N_M = grad_N_M.to(_acc(ctx.cdt))
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(ctx.cdt), None if bias is None else bias.to(ctx.cdt)
            for start in range(0, hidden.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                g = g_N_M[rows]
                # d log p(v_m) / d z = onehot(v_m) - p, so dz = scatter(g) - p * sum_m g (in place: one buffer)
                dz = _mask_padded_(_chunk_logits(hidden[rows], w, b, ctx.temperature), ctx.vocab)
                dz.sub_(lse_N[rows, None]).exp_().mul_(-g.sum(1, keepdim=True))
                dz.scatter_add_(1, ids[rows], g)
                if ctx.temperature != 1.0:
                    dz.div_(ctx.temperature)
                _head_grads_(dz, hidden[rows], w, grads, rows)
                del dz
        return *_returned_grads(grads, weight, bias), None, None, None, None, None, None, None


def _gather_checkpointed(
    hidden_N_H: torch.Tensor,
    head: torch.nn.Module,
    ids_N_M: torch.Tensor,
    chunk_rows: int,
    temperature: float,
    vocab: int,
    top_k: int,
    want_entropy: bool,
) -> GatheredLogprobs:
    def chunk_fn(h_C_H: torch.Tensor, ids_C_M: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = head(h_C_H)
        logits = logits.to(_acc(logits.dtype))
        if temperature != 1.0:
            logits = logits / temperature
        if vocab < logits.shape[1]:  # padded rows, not tokens: out of the normaliser (see _mask_padded_)
            logits = logits.masked_fill(
                torch.arange(logits.shape[1], device=logits.device) >= vocab, -torch.inf
            )
        logp = torch.log_softmax(logits, dim=-1)
        extras = []
        with torch.no_grad():
            if top_k:
                v, i = logp.topk(top_k, dim=-1)
                extras += [i, v]
            if want_entropy:
                p = logp.exp()
                extras.append(_entropy_from_logprobs_(logp.detach().clone(), p))
        return (logp.gather(1, ids_C_M), *extras)

    parts = [
        checkpoint(chunk_fn, hidden_N_H[s : s + chunk_rows], ids_N_M[s : s + chunk_rows], use_reentrant=False)
        for s in range(0, hidden_N_H.shape[0], chunk_rows)
    ] or [chunk_fn(hidden_N_H, ids_N_M)]  # N = 0: one empty chunk keeps the output shapes right
    cols = list(zip(*parts, strict=True))
    cat = [torch.cat(c, dim=0) for c in cols]
    ti, tv = (cat[1], cat[2]) if top_k else (None, None)
    ent = cat[-1] if want_entropy else None
    return GatheredLogprobs(cat[0], ent, ti, tv)


def gather_logprobs(
    hidden_N_H: torch.Tensor,
    head: torch.nn.Module,
    ids_N_M: torch.Tensor,
    *,
    top_k: int = 0,
    want_entropy: bool = False,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    method: Literal["recompute", "checkpoint"] = "recompute",
) -> GatheredLogprobs:
    """Student log-probs at given ids, normalised over the vocabulary (the first ``vocab_size`` ids), in
    row chunks.

    Args:
        hidden_N_H: (N, H) final hidden states of the positions (already flattened and masked).
        head: the output layer, ``nn.Linear`` with weight (V, H) (optional bias; tied weights are fine).
        ids_N_M: (N, M) int64 ids in [0, vocab_size) whose log-probs are wanted (duplicates allowed).
        top_k: also return the top-k ids and log-probs per row (no gradient); 0 = no.
        want_entropy: also return H(p) per row in nats (no gradient).
        temperature: logits are divided by it first (the rollout temperature; 1.0 in the paper).
        vocab_size: normalise over ids [0, vocab_size) only (the tokenizer's length when the output layer is
            padded, Qwen: 151,669 of 151,936 rows): the rows above get no mass, no entropy, no top-k place
            and no gradient. None = every row of the head.
        chunk_rows: rows per chunk; extra memory ~ chunk_rows * V * 4 bytes (x2 in forward).
        method: "recompute" (custom autograd.Function, default) or "checkpoint" (torch.utils.checkpoint).
    Returns:
        :class:`GatheredLogprobs`; ``logprobs_N_M`` (N, M) fp32 is differentiable w.r.t. hidden and head.
    """
    _check_inputs(hidden_N_H, head, chunk_rows, top_k)
    rows_v = head.weight.shape[0]
    vocab = rows_v if vocab_size is None else vocab_size
    if not 0 < vocab <= rows_v:
        raise ValueError(f"vocab_size must be in 1..{rows_v} (the head's rows), got {vocab_size}")
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds vocab_size={vocab}")
    _check_ids("ids_N_M", ids_N_M, hidden_N_H.shape[0], vocab, dims=2)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids_N_M = ids_N_M.long()
    if method == "checkpoint":
        return _gather_checkpointed(
            hidden_N_H, head, ids_N_M, chunk_rows, temperature, vocab, top_k, want_entropy
        )
    if method != "recompute":
        raise ValueError(f"method must be 'recompute' or 'checkpoint', got {method!r}")
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"method='recompute' needs an nn.Linear head, got {type(head).__name__}")
    sink: dict[str, torch.Tensor | None] = {}
    lp = _GatherLogprobs.apply(
        hidden_N_H, head.weight, head.bias, ids_N_M, chunk_rows, temperature, vocab, top_k, want_entropy, sink
    )
    return GatheredLogprobs(lp, sink["entropy"], sink["topk_ids"], sink["topk_logprobs"])


# ---------------------------------------------------------------------------------- full-vocabulary KL


def head_logits(
    teacher_hidden_N_H: torch.Tensor, teacher_head: torch.nn.Module, temperature: float = 1.0
) -> TeacherLogits:
    """A ``teacher_logits(start, stop)`` callable from an in-process teacher's final hidden states; the
    logits are divided by ``temperature`` (the rollout's, so that both sides of the KL are tempered)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def teacher_logits(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            logits = teacher_head(teacher_hidden_N_H[start:stop].detach())
            return logits if temperature == 1.0 else logits.float() / temperature

    teacher_logits.returns_fresh_tensor = True  # type: ignore[attr-defined]  # may be normalised in place
    return teacher_logits


def _teacher_logprobs(
    teacher_logits: TeacherLogits,
    start: int,
    stop: int,
    vocab: int,
    floor: float,
    exact_vocab: bool,
    extras: dict | None = None,
) -> torch.Tensor:
    """Floored teacher log q of rows start..stop over the first ``vocab`` ids, fp32, (C, vocab).

    ``exact_vocab``: the teacher must have exactly ``vocab`` columns (no vocab_size given by the caller).

    ``extras`` (if given) receives the unfloored top-k and entropy under the keys "topk" and "entropy".
    """
    with torch.no_grad():
        t = teacher_logits(start, stop)
        if t.dim() != 2 or t.shape[0] != stop - start or t.shape[1] < vocab:
            raise ValueError(
                f"teacher_logits({start}, {stop}) must return ({stop - start}, >= {vocab}), got {tuple(t.shape)}"
            )
        if exact_vocab and t.shape[1] != vocab:
            raise ValueError(
                f"teacher logits have {t.shape[1]} columns but the student head has {vocab} rows; if the "
                "tokenizers are identical and only the configs pad the vocabulary differently, pass "
                "vocab_size=len(tokenizer)"
            )
        logq = t[:, :vocab].to(_acc(t.dtype))
        # An fp32 result is the callable's own tensor: normalise it in place only if it is a fresh output
        # (head_logits); otherwise it may be a view of the caller's logits, which must stay intact.
        if logq.data_ptr() == t.data_ptr() and not getattr(teacher_logits, "returns_fresh_tensor", False):
            logq = logq.clone()
        del t
        logq.sub_(torch.logsumexp(logq, dim=-1, keepdim=True))
        if extras is not None:
            if extras["k"]:
                extras["topk"] = logq.topk(extras["k"], dim=-1)
            extras["entropy"] = _entropy_from_logprobs_(logq, logq.exp())
        return logq.clamp_min_(floor)


class _FullVocabReverseKL(torch.autograd.Function):
    """KL(p || q) per row; saves lse_N and kl_N, recomputes student and teacher logits in backward.

    d KL / d z_j = p_j * (log p_j - log q_j - KL) for student logits z (teacher held fixed).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, chunk_rows, temperature, floor, opts, sink):
        n, top_k, sample_ids = hidden.shape[0], opts["top_k"], opts["sample_ids"]
        cdt = _compute_dtype(hidden, weight)
        dev = hidden.device
        acc = _acc(cdt)
        kl_N, lse_N, hs_N, ht_N = (torch.empty(n, dtype=acc, device=dev) for _ in range(4))
        lps_N = torch.empty(n, dtype=acc, device=dev) if sample_ids is not None else None
        lpt_N = torch.empty_like(lps_N) if lps_N is not None else None
        tops = [torch.empty(n, top_k, dtype=dt, device=dev) for dt in (torch.long, acc) * 2]
        with torch.autocast(dev.type, enabled=False):
            w, b = weight.to(cdt), None if bias is None else bias.to(cdt)
            for start in range(0, n, chunk_rows):
                rows, stop = slice(start, start + chunk_rows), min(start + chunk_rows, n)
                extras: dict[str, Any] = {"k": top_k}
                logq = _teacher_logprobs(
                    teacher_logits, start, stop, w.shape[0], floor, opts["exact"], extras
                )
                ht_N[rows] = extras["entropy"]
                logp = _chunk_logits(hidden[rows], w, b, temperature)
                lse = torch.logsumexp(logp, dim=-1)
                lse_N[rows] = lse
                logp.sub_(lse[:, None])
                if top_k:
                    sv, si = logp.topk(top_k, dim=-1)
                    tv, ti = extras["topk"]
                    tops[0][rows], tops[1][rows], tops[2][rows], tops[3][rows] = si, sv, ti, tv
                if sample_ids is not None:
                    lps_N[rows] = logp.gather(1, sample_ids[rows, None]).squeeze(1)
                    lpt_N[rows] = logq.gather(1, sample_ids[rows, None]).squeeze(1)
                p = logp.exp()
                logp.clamp_(min=torch.finfo(logp.dtype).min)  # p = 0 entries: finite log-ratio, p * d = 0
                d = logq.neg_().add_(logp)  # log p - log q, in the teacher's buffer
                kl_N[rows] = d.mul_(p).sum(-1)
                hs_N[rows] = -p.mul_(logp).sum(-1)
                del logp, logq, p, d, extras
        ctx.save_for_backward(hidden, weight, bias, lse_N, kl_N)
        ctx.teacher_logits, ctx.chunk_rows, ctx.temperature = teacher_logits, chunk_rows, temperature
        ctx.floor, ctx.cdt, ctx.exact = floor, cdt, opts["exact"]
        sink.update(student_entropy=hs_N, teacher_entropy=ht_N, lps=lps_N, lpt=lpt_N)
        sink["tops"] = tops if top_k else [None] * 4
        return kl_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden, weight, bias, lse_N, kl_N = ctx.saved_tensors
        grads = _grad_buffers(ctx, hidden, weight, bias)
        g_N = grad_N.to(_acc(ctx.cdt))
        n = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(ctx.cdt), None if bias is None else bias.to(ctx.cdt)
            for start in range(0, n, ctx.chunk_rows):
                rows, stop = slice(start, start + ctx.chunk_rows), min(start + ctx.chunk_rows, n)
                # dz = g * p * (log p - log q - KL), in two [C, V] buffers: d = log p - log q - KL overwrites
                # log q, then log p becomes p in place and then dz
                d = _teacher_logprobs(ctx.teacher_logits, start, stop, w.shape[0], ctx.floor, ctx.exact)
                logp = _chunk_logits(hidden[rows], w, b, ctx.temperature).sub_(lse_N[rows, None])
                logp.clamp_(min=torch.finfo(logp.dtype).min)  # p = 0 entries: finite d, p * d = 0, not NaN
                d.neg_().add_(logp).sub_(kl_N[rows, None])
                dz = logp.exp_().mul_(d).mul_(g_N[rows, None])
                del logp, d  # dz is the logp buffer: drop every other name of it before the next chunk
                if ctx.temperature != 1.0:
                    dz.div_(ctx.temperature)
                _head_grads_(dz, hidden[rows], w, grads, rows)
                del dz
        return *_returned_grads(grads, weight, bias), None, None, None, None, None, None


def full_vocab_reverse_kl(
    hidden_N_H: torch.Tensor,
    head: torch.nn.Linear,
    teacher_logits: TeacherLogits,
    *,
    vocab_size: int | None = None,
    sample_ids_N: torch.Tensor | None = None,
    top_k: int = 0,
    temperature: float = 1.0,
    teacher_logprob_floor: float = TEACHER_LOGPROB_FLOOR,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> FullVocabKL:
    """Exact per-row reverse KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the vocabulary, in chunks.

    Args:
        hidden_N_H: (N, H) student final hidden states (with grad).
        head: the student's output layer, ``nn.Linear`` with weight (V_s, H).
        teacher_logits: ``f(start, stop) -> (stop - start, V_t)`` teacher logits of those rows (no grad
            needed; see :func:`head_logits`). Called once per chunk in forward and again in backward.
        vocab_size: compare only the first ``vocab_size`` ids (the tokenizer's length) and normalise both
            sides over them; needed when the configs pad the vocabulary differently (V_s != V_t).
        sample_ids_N: (N,) sampled ids; if given, both sides' log-probs there are returned (no grad).
        top_k: also return each side's top-k ids and log-probs (no grad), for the overlap metrics.
        temperature: the student's logits are divided by it; the teacher's callable must apply the same
            one (``head_logits(..., temperature)``) for the KL of the tempered distributions.
        teacher_logprob_floor: teacher log-probs below it are raised to it, so a teacher that gives an id zero
            probability yields a large finite KL instead of inf/NaN (see ``losses.TEACHER_LOGPROB_FLOOR``).
        chunk_rows: rows per chunk; extra memory ~ 3 * chunk_rows * V * 4 bytes.
    Returns:
        :class:`FullVocabKL`; ``kl_N`` (N,) fp32 is differentiable w.r.t. the student's hidden and head.
    """
    _check_inputs(hidden_N_H, head, chunk_rows, top_k)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"head must be an nn.Linear, got {type(head).__name__}")
    v_s = head.weight.shape[0]
    vocab = v_s if vocab_size is None else vocab_size
    if not 0 < vocab <= v_s:
        raise ValueError(f"vocab_size must be in 1..{v_s} (the student head's rows), got {vocab_size}")
    # Slicing the weight keeps each chunk's logits at (C, vocab); the padded rows then get zero gradient.
    weight, bias = head.weight[:vocab], None if head.bias is None else head.bias[:vocab]
    if sample_ids_N is not None:
        _check_ids("sample_ids_N", sample_ids_N, hidden_N_H.shape[0], vocab, dims=1)
        sample_ids_N = sample_ids_N.long()
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sink: dict[str, Any] = {}
    opts = {"top_k": min(top_k, vocab), "sample_ids": sample_ids_N, "exact": vocab_size is None}
    kl = _FullVocabReverseKL.apply(
        hidden_N_H,
        weight,
        bias,
        teacher_logits,
        chunk_rows,
        temperature,
        teacher_logprob_floor,
        opts,
        sink,
    )
    return FullVocabKL(
        kl, sink["student_entropy"], sink["teacher_entropy"], sink["lps"], sink["lpt"], *sink["tops"]
    )
