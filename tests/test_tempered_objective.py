"""The objective matches the sampling (issue 10, part 4): tempered losses, refused truncation, padded rows.

Part 1, exact math in fp64 on a toy vocabulary (V = 7 real ids plus 2 padded output rows that carry most of
the raw mass, so forgetting to exclude them cannot pass): through ``opd.step.forward``, the expectation over
the sampled token y ~ p_T of the sampled-token loss gradient (every y enumerated, weighted by p_T(y)) equals
autograd of KL(p_T || q_T) computed directly; so does student_topk at k = V (both forms); teacher_topk
equals the brute-force bucket KL of the tempered distributions; full_vocab with a tempered in-process
teacher equals KL(p_T || q_T). T = 1 log-probs with T = 0.7 samples, or top-p samples, do not match.

Part 2, the refusals: ``rollout.top_p < 1`` in config validation (and its override), a teacher that scores
at temperature 1 only at connect time (a real server over HTTP).

Part 3, a tiny model whose output layer is padded beyond its tokenizer (real ``save_pretrained``): the
student's chunked log-probs, the transformers backend's (over real HTTP) and the in-process teacher's sum to
1 over the tokenizer's ids and equal a brute-force log_softmax of the sliced logits; a server that normalises
over the padded rows says so in ``/v1/model`` and the trainer warns.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import httpx
import numpy as np
import pytest
import torch

from devkit.teacher_process import free_port, serve_in_thread
from devkit.tiny_models import STUDENT_SPEC, build_model, build_tokenizer
from shared.protocol import Capabilities
from student_trainer.config import Config, LossConfig, RolloutConfig, TeacherConfig, load_config
from student_trainer.data.prompts import Prompt
from student_trainer.errors import ConfigError
from student_trainer.opd.batch import OPDBatch
from student_trainer.opd.chunked import gather_logprobs, head_logits
from student_trainer.opd.loss_table import LOSSES
from student_trainer.opd.policy import pack
from student_trainer.opd.step import forward, rollout_phase
from student_trainer.rollout.base import RolloutBatch, RolloutSample
from student_trainer.teacher.base import PendingScores, Teacher, TeacherScores
from student_trainer.teacher.connect import connect_teacher
from student_trainer.teacher.errors import TeacherIncompatible

F64 = torch.float64
V, PAD, H = 7, 2, 5  # real ids, padded output rows, hidden size
T = 0.7
ATOL = 1e-6


# ------------------------------------------------------------------------------------ part 1: the toy
class Toy:
    """A student (embedding -> hidden, linear head with V + PAD rows) and a teacher's logits, all fp64."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(V, H).to(F64)  # input ids: the prompt [1] and y
        self.head = torch.nn.Linear(H, V + PAD, bias=False).to(F64)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(V, H, generator=g, dtype=F64))
            self.head.weight.copy_(torch.randn(V + PAD, H, generator=g, dtype=F64))
            self.head.weight[V:] *= 6.0  # padded rows: not tokens, but large raw logits
        # the teacher, in-process form (hidden + padded head) and its logits over the real ids
        self.t_hidden = torch.randn(1, H, generator=g, dtype=F64)
        self.t_head = torch.nn.Linear(H, V + PAD, bias=False).to(F64).requires_grad_(False)
        with torch.no_grad():
            self.t_head.weight.copy_(1.5 * torch.randn(V + PAD, H, generator=g, dtype=F64))
        self.u = self.t_head(self.t_hidden)[0, :V].detach()
        self.params = [self.emb.weight, self.head.weight]

    def policy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head_fn=None):
        hidden = self.emb(input_ids)
        return hidden if head_fn is None else head_fn(hidden, self.head)

    def student_logits(self) -> torch.Tensor:
        """(V,) with grad: the logits predicting the completion token after prompt [1], real ids only."""
        return self.head(self.emb.weight[1])[:V]

    def logp(self, t: float) -> torch.Tensor:
        return torch.log_softmax(self.student_logits() / t, -1)

    def logq(self, t: float) -> torch.Tensor:
        return torch.log_softmax(self.u / t, -1)

    def grads(self, scalar: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.flatten() for g in torch.autograd.grad(scalar, self.params)])

    def kl_grad(self, t: float) -> torch.Tensor:
        """autograd of KL(p_t || q_t), computed directly over the real ids."""
        logp, logq = self.logp(t), self.logq(t)
        return self.grads((logp.exp() * (logp - logq)).sum())

    def batch(self, y: int, t: float, student_ids: list[int]) -> OPDBatch:
        """Prompt [1], completion [y], stored S = ``student_ids``; the teacher's scores at temperature t
        (what the service returns; its top-k has the same k)."""
        with torch.no_grad():
            logp, logq = self.logp(t), self.logq(t)
        s_ids = torch.tensor([student_ids])
        t_ids = logq.topk(len(student_ids)).indices[None]
        return OPDBatch(
            packed=pack([[1]], [[y]], pad_id=0),
            student_topk_ids_N_K=s_ids,
            student_topk_logprobs_N_K=logp[s_ids],
            teacher_logprob_N=logq[[y]],
            teacher_topk_ids_N_k=t_ids,
            teacher_topk_logprobs_N_k=logq[t_ids],
            teacher_candidate_logprobs_N_K=logq[s_ids],
            teacher_entropy_N=None,
        )

    def loss(self, loss_type: str, batch: OPDBatch, t: float, form: str = "paper", teacher_logits=None):
        cfg = LossConfig(type=loss_type, top_k=batch.student_topk_ids_N_K.shape[1], topk_form=form)
        loss, _ = forward(
            self.policy,
            batch,
            cfg,
            LOSSES[loss_type],
            1.0,
            teacher_logits=teacher_logits,
            vocab_size=V,
            temperature=t,
        )
        return loss


def expected_sampled_token_grad(toy: Toy, weights_V: torch.Tensor, t_loss: float) -> torch.Tensor:
    """E_{y ~ weights}[grad of the sampled-token loss at temperature t_loss], every y enumerated."""
    total = 0
    for y in range(V):
        loss = toy.loss("sampled_token", toy.batch(y, t_loss, list(range(V))), t_loss)
        total = total + weights_V[y] * toy.grads(loss)
    return total


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def top_p_weights(p_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus sampling distribution: the smallest top set with mass >= top_p, renormalised."""
    order = p_V.argsort(descending=True)
    keep = order[: int((p_V[order].cumsum(0) < top_p).sum()) + 1]
    out = torch.zeros_like(p_V)
    out[keep] = p_V[keep]
    return out / out.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_token_expected_gradient_is_the_tempered_kl_gradient(seed):
    toy = Toy(seed)
    p_T = toy.logp(T).detach().exp()
    got = expected_sampled_token_grad(toy, p_T, T)
    torch.testing.assert_close(got, toy.kl_grad(T), atol=ATOL, rtol=0)
    # the toy's padded rows matter: over all rows the raw distribution would be another one
    with torch.no_grad():
        raw = torch.softmax(toy.head(toy.emb.weight[1]), -1)
    assert float(raw[V:].sum()) > 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_one_logprobs_with_tempered_samples_do_not_match(seed):
    """What the loss did before: log-probs at T = 1 whatever the rollout temperature. Its expected gradient
    under y ~ p_0.7 is neither the gradient of KL(p_0.7 || q_0.7) nor that of KL(p_1 || q_1)."""
    toy = Toy(seed)
    p_T = toy.logp(T).detach().exp()
    old = expected_sampled_token_grad(toy, p_T, 1.0)
    assert rel_err(old, toy.kl_grad(T)) > 0.05, rel_err(old, toy.kl_grad(T))
    assert rel_err(old, toy.kl_grad(1.0)) > 0.05, rel_err(old, toy.kl_grad(1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_p_samples_bias_the_sampled_token_gradient(seed):
    """Why the config refuses top_p < 1: with nucleus samples the estimator is not the KL's gradient."""
    toy = Toy(seed)
    p_1 = toy.logp(1.0).detach().exp()
    biased = expected_sampled_token_grad(toy, top_p_weights(p_1, 0.8), 1.0)
    assert rel_err(biased, toy.kl_grad(1.0)) > 0.05, rel_err(biased, toy.kl_grad(1.0))


@pytest.mark.parametrize("form", ["paper", "direct"])
@pytest.mark.parametrize("seed", [0, 1])
def test_student_topk_with_k_equal_to_the_vocabulary_is_the_tempered_kl_gradient(form, seed):
    toy = Toy(seed)
    support = toy.logp(T).detach().argsort(descending=True).tolist()  # k = V: every real id
    loss = toy.loss("student_topk", toy.batch(3, T, support), T, form=form)
    torch.testing.assert_close(toy.grads(loss), toy.kl_grad(T), atol=ATOL, rtol=0)
    if form == "direct":  # renormalised over S = everything: the value is the KL itself
        logp, logq = toy.logp(T), toy.logq(T)
        assert float(loss.detach()) == pytest.approx(
            float((logp.exp() * (logp - logq)).sum().detach()), abs=ATOL
        )


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_topk_is_the_bucket_kl_of_the_tempered_distributions(seed):
    toy = Toy(seed)
    batch = toy.batch(0, T, [0, 1, 2])  # k = 3 on both sides
    loss = toy.loss("teacher_topk", batch, T)
    ids = batch.teacher_topk_ids_N_k[0]
    logp, logq = toy.logp(T), toy.logq(T)
    p_b = torch.cat([logp[ids].exp(), 1 - logp[ids].exp().sum(0, keepdim=True)])
    q_b = torch.cat([logq[ids].exp(), 1 - logq[ids].exp().sum(0, keepdim=True)])
    ref = (p_b * (p_b.log() - q_b.log())).sum()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=ATOL)
    torch.testing.assert_close(toy.grads(loss), toy.grads(ref), atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_full_vocab_with_a_tempered_local_teacher_is_the_tempered_kl(seed):
    toy = Toy(seed)
    batch = toy.batch(4, T, list(range(V)))
    loss = toy.loss("full_vocab", batch, T, teacher_logits=head_logits(toy.t_hidden, toy.t_head, T))
    logp, logq = toy.logp(T), toy.logq(T)
    assert float(loss.detach()) == pytest.approx(float((logp.exp() * (logp - logq)).sum().detach()), abs=ATOL)
    torch.testing.assert_close(toy.grads(loss), toy.kl_grad(T), atol=ATOL, rtol=0)
    # an untempered teacher callable gives another objective (both sides must be divided by T)
    untempered = toy.loss("full_vocab", batch, T, teacher_logits=head_logits(toy.t_hidden, toy.t_head))
    assert abs(float(untempered.detach()) - float(loss.detach())) > 1e-3


@pytest.mark.parametrize("method", ["recompute", "checkpoint"])
def test_gather_logprobs_excludes_padded_rows_from_normaliser_entropy_topk_and_gradient(method):
    toy = Toy(0)
    hidden = toy.emb.weight[1:2]
    ids = torch.arange(V)[None]
    out = gather_logprobs(
        hidden, toy.head, ids, top_k=V, want_entropy=True, temperature=T, vocab_size=V, method=method
    )
    ref = toy.logp(T)[None]
    torch.testing.assert_close(out.logprobs_N_M, ref, atol=1e-12, rtol=0)
    assert float(out.logprobs_N_M.detach().exp().sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(out.entropy_N[0]) == pytest.approx(float(-(ref.exp() * ref).sum().detach()), abs=1e-12)
    assert int(out.topk_ids_N_k.max()) < V
    (g,) = torch.autograd.grad(out.logprobs_N_M[0, 2], [toy.head.weight])
    assert float(g[V:].abs().max()) == 0.0 and float(g[:V].abs().max()) > 0
    with pytest.raises(ValueError, match=r"must lie in \[0, 7\)"):
        gather_logprobs(hidden, toy.head, torch.tensor([[V]]), vocab_size=V, method=method)


class _RecordingTeacher(Teacher):
    capabilities = {"candidate_ids": True, "entropy": True}

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def submit(self, prompts, rollouts, top_k, *, temperature=1.0) -> PendingScores:
        self.calls.append(dict(top_k=top_k, temperature=temperature))

        class _Done(PendingScores):
            def wait(self) -> None:
                pass

            def result(self) -> TeacherScores:
                return TeacherScores([])

        return _Done()


class _FakeEngine:
    policy_version = 0

    def generate(self, prompts, **kw):
        self.kw = kw
        sample = RolloutSample(
            0,
            0,
            torch.tensor([1]),
            torch.tensor([2]),
            torch.zeros(1, 0).long(),
            torch.zeros(1, 0),
            torch.zeros(1),
            True,
        )
        return RolloutBatch([sample], 0, 1, 0)


def test_rollout_phase_asks_the_teacher_at_the_rollout_temperature():
    cfg = Config(rollout=RolloutConfig(temperature=T), loss=LossConfig(type="sampled_token", top_k=0))
    teacher, engine = _RecordingTeacher(), _FakeEngine()
    prompt = Prompt("p0", "q", None, student_ids=[1], teacher_ids=[1])
    rollout_phase(engine, teacher, [[prompt]], cfg, step=0, rank=0, autocast=nullcontext)
    assert engine.kw["temperature"] == T and teacher.calls == [dict(top_k=0, temperature=T)]


# ------------------------------------------------------------------------------- part 2: the refusals
def test_config_refuses_top_p_below_one_unless_the_bias_is_allowed():
    with pytest.raises(ConfigError, match=r"rollout\.top_p=0\.9 .*biased.*loss\.allow_biased_sampling=true"):
        Config(rollout=RolloutConfig(top_p=0.9))
    for loss_type in LOSSES:  # every OPD loss differentiates the untruncated distribution
        with pytest.raises(ConfigError, match="allow_biased_sampling"):
            load_config(None, [f"loss.type={loss_type}", "teacher.local=x", "rollout.top_p=0.95"])
    ok = load_config(None, ["rollout.top_p=0.9", "loss.allow_biased_sampling=true"])
    assert ok.rollout.top_p == 0.9 and ok.loss.allow_biased_sampling
    assert Config(rollout=RolloutConfig(temperature=0.6)).rollout.top_p == 1.0  # temperature alone is fine


# --------------------------------------------------------------------- part 3: a padded tiny model
EXTRA_ROWS = 24


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """A tiny Qwen3 whose output layer has EXTRA_ROWS rows past its tokenizer, with much mass on them."""
    tok = build_tokenizer(vocab_size=300)
    model = build_model(tok, STUDENT_SPEC, seed=5, vocab_size=len(tok) + EXTRA_ROWS)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[len(tok) :] = 3.0 * w[:EXTRA_ROWS]
    path = tmp_path_factory.mktemp("padded")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ids = tok("What is 12 + 30? Let us add the digits.", add_special_tokens=False)["input_ids"]
    prompt, completion = ids[:5], ids[5:]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    assert logits.shape[-1] == len(tok) + EXTRA_ROWS
    assert float(torch.softmax(logits, -1)[:, len(tok) :].sum(-1).mean()) > 0.05, "padded rows carry mass"
    return dict(path=path, tok=tok, model=model, prompt=prompt, completion=completion, logits=logits)


def brute(padded: dict, t: float) -> torch.Tensor:
    """(T, len(tok)) log_softmax of the sliced logits at temperature t."""
    return torch.log_softmax(padded["logits"][:, : len(padded["tok"])] / t, -1)


@pytest.mark.parametrize("t", [1.0, T])
def test_student_logprobs_sum_to_one_over_tokenizer_ids(padded, t):
    from student_trainer.opd.policy import HiddenStatesLM

    n_tok = len(padded["tok"])
    policy = HiddenStatesLM(padded["model"])
    packed = pack([padded["prompt"]], [padded["completion"]], pad_id=0)
    with torch.no_grad():
        hidden = packed.hidden_at_completion(policy(packed.input_ids_B_L, packed.attention_mask_B_L))
    all_ids = torch.arange(n_tok).expand(hidden.shape[0], n_tok)
    out = gather_logprobs(hidden, policy.head, all_ids, top_k=8, temperature=t, vocab_size=n_tok)
    lp = out.logprobs_N_M.double()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[0], dtype=F64), atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, brute(padded, t), atol=1e-4, rtol=0)
    assert int(out.topk_ids_N_k.max()) < n_tok


def _servers(path):
    """Two real transformers-backend apps on the padded model: ``hf`` as it is, and ``vllm_like``, made to
    behave as the vLLM backend reports itself (temperature 1 only, normalised over every output row)."""
    from teacher_server.app import create_app
    from teacher_server.backends.hf import HFBackend
    from teacher_server.config import ServerConfig

    class VLLMLike(HFBackend):
        def _load_sync(self) -> None:
            super()._load_sync()
            self.normalized_vocab_size = self.model_vocab_size  # as vLLM: the padded rows share the mass

        def capabilities(self) -> Capabilities:
            return Capabilities(candidate_ids=True, entropy=True, temperature=False, generate=True)

    apps = {}
    for name, cls in (("hf", HFBackend), ("vllm_like", VLLMLike)):
        cfg = ServerConfig(model=str(path), port=free_port(), device="cpu", max_candidates=512)
        apps[name] = (create_app(cfg, backend=cls(cfg)), cfg.port)
    return apps


@pytest.fixture(scope="module")
def servers(padded):
    apps = _servers(padded["path"])
    with serve_in_thread(*apps["hf"]) as hf_url, serve_in_thread(*apps["vllm_like"]) as other_url:
        for url in (hf_url, other_url):
            deadline = time.monotonic() + 60
            while httpx.get(url + "/ready").status_code != 200:
                assert time.monotonic() < deadline, "server not ready"
                time.sleep(0.05)
        yield dict(hf=hf_url, vllm_like=other_url)


def _score(url: str, padded: dict, t: float) -> dict:
    n_tok = len(padded["tok"])
    seq = {
        "prompt_ids": padded["prompt"],
        "completion_ids": padded["completion"],
        "candidate_ids": [list(range(n_tok))] * len(padded["completion"]),
    }
    body = {"sequences": [seq], "top_k": 8, "return_entropy": True, "temperature": t}
    reply = httpx.post(url + "/v1/score", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["results"][0]


def test_server_reports_what_it_normalises_over(servers, padded):
    n_tok = len(padded["tok"])
    hf = httpx.get(servers["hf"] + "/v1/model").json()
    assert (hf["vocab_size"], hf["model_vocab_size"], hf["normalized_vocab_size"]) == (
        n_tok,
        n_tok + EXTRA_ROWS,
        n_tok,
    )
    other = httpx.get(servers["vllm_like"] + "/v1/model").json()
    assert other["normalized_vocab_size"] == n_tok + EXTRA_ROWS
    from shared.protocol import ModelInfo

    old = {k: v for k, v in hf.items() if k != "normalized_vocab_size"}  # an older server's document
    assert ModelInfo.model_validate(old).normalized_vocab_size is None


@pytest.mark.parametrize("t", [1.0, T])
def test_hf_backend_logprobs_sum_to_one_over_tokenizer_ids_over_http(servers, padded, t):
    res = _score(servers["hf"], padded, t)
    ref = brute(padded, t)
    cand = torch.tensor(res["candidate_logprobs"], dtype=F64)
    torch.testing.assert_close(cand.exp().sum(-1), torch.ones(cand.shape[0], dtype=F64), atol=1e-5, rtol=0)
    torch.testing.assert_close(cand, ref, atol=1e-4, rtol=0)
    targets = torch.tensor(padded["completion"])[:, None]
    torch.testing.assert_close(
        torch.tensor(res["logprobs"], dtype=F64), ref.gather(1, targets)[:, 0], atol=1e-4, rtol=0
    )
    assert max(max(row) for row in res["topk_ids"]) < len(padded["tok"])
    ent = -(ref.exp() * ref).sum(-1)
    torch.testing.assert_close(torch.tensor(res["entropy"], dtype=F64), ent, atol=1e-4, rtol=0)


def test_a_server_normalising_over_padded_rows_is_biased_and_refuses_temperature(servers, padded):
    res = _score(servers["vllm_like"], padded, 1.0)
    mass = np.exp(np.asarray(res["candidate_logprobs"], dtype=np.float64)).sum(-1)
    assert float(mass.max()) < 0.99, "the padded rows took some of the mass"
    body = {"sequences": [{"prompt_ids": [1], "completion_ids": [2]}], "temperature": T}
    assert httpx.post(servers["vllm_like"] + "/v1/score", json=body).status_code == 422


def _cfg(url: str, temperature: float) -> Config:
    return Config(
        teacher=TeacherConfig(urls=[url], max_retry_wait_s=5.0),
        rollout=RolloutConfig(temperature=temperature),
        loss=LossConfig(type="teacher_topk", top_k=8),
    )


def test_connect_refuses_a_temperature_1_teacher_for_a_tempered_rollout(servers, padded):
    from shared.fingerprint import tokenizer_fingerprint

    fp = tokenizer_fingerprint(padded["tok"])
    with pytest.raises(TeacherIncompatible, match=r"rollout\.temperature=0\.7"):
        connect_teacher(_cfg(servers["vllm_like"], T), fp, warn=lambda _: None)
    warnings: list[str] = []
    teacher = connect_teacher(_cfg(servers["vllm_like"], 1.0), fp, warn=warnings.append)
    teacher.close()
    n_tok = len(padded["tok"])
    assert len(warnings) == 1 and f"over {n_tok + EXTRA_ROWS} ids" in warnings[0] and "biased" in warnings[0]
    warnings.clear()
    teacher = connect_teacher(_cfg(servers["hf"], T), fp, warn=warnings.append)
    teacher.close()
    assert warnings == []


def _rollouts(padded: dict, k: int) -> tuple[list[Prompt], RolloutBatch]:
    comp = torch.tensor(padded["completion"])
    ids = torch.arange(k).expand(len(comp), k).clone()
    sample = RolloutSample(
        0,
        0,
        torch.tensor(padded["prompt"]),
        comp,
        ids,
        torch.zeros(len(comp), k),
        torch.zeros(len(comp)),
        True,
    )
    prompt = Prompt("p0", "q", None, student_ids=padded["prompt"], teacher_ids=padded["prompt"])
    return [prompt], RolloutBatch([sample], 0, 1, k)


def test_remote_and_local_teachers_score_tempered_over_tokenizer_ids(servers, padded):
    from shared.fingerprint import tokenizer_fingerprint
    from student_trainer.teacher.local import LocalTeacher

    prompts, rollouts = _rollouts(padded, 16)
    ref = brute(padded, T)
    remote = connect_teacher(_cfg(servers["hf"], T), tokenizer_fingerprint(padded["tok"]), warn=print)
    local = LocalTeacher(str(padded["path"]), torch.device("cpu"), torch.float32)
    try:
        for teacher in (remote, local):
            (sc,) = teacher.submit(prompts, rollouts, 8, temperature=T).result().scores
            torch.testing.assert_close(
                torch.tensor(sc.candidate_logprobs).double(), ref[:, :16], atol=1e-4, rtol=0
            )
            top = ref.topk(8, -1).values
            torch.testing.assert_close(torch.tensor(sc.topk_logprobs).double(), top, atol=1e-4, rtol=0)
        # the in-process teacher's logits for full_vocab are tempered too
        scores = local.submit(prompts, rollouts, 8, temperature=T).result()
        logits = scores.logits(0, len(padded["completion"])).double()
        n_tok = len(padded["tok"])
        torch.testing.assert_close(torch.log_softmax(logits[:, :n_tok], -1), ref, atol=1e-4, rtol=0)
    finally:
        remote.close()
        local.close()
