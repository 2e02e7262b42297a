"""The loss table is the one place a loss is described: every row's wiring (which columns, which teacher
fields) against the pure loss functions fed from a plain full-vocabulary log_softmax, and every reader of the
table (config validation, the teacher capability check, the batch builder) reacting to a new row."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from shared.protocol import Capabilities, ModelInfo
from shared.wire import ScoredSequence
from student_trainer.config import ConfigError, LossConfig, from_dict
from student_trainer.opd import loss_table, losses
from student_trainer.opd.batch import build_batch
from student_trainer.opd.step import forward
from student_trainer.rollout.base import RolloutSample
from student_trainer.teacher.compat import check_compatibility
from student_trainer.teacher.errors import TeacherIncompatible, TeacherProtocolError

V, H, K = 23, 8, 4
LENGTHS = [(3, 5), (2, 4)]  # (prompt, completion) per sample


class TinyPolicy(torch.nn.Module):
    """An embedding and one tanh layer: hidden states that depend on the input ids, with parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, H)
        self.mix = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, input_ids, attention_mask, head_fn=None):
        hidden = torch.tanh(self.mix(self.embed(input_ids))) * attention_mask[..., None]
        return hidden if head_fn is None else head_fn(hidden, self.head)


def _case():
    g = torch.Generator().manual_seed(1)
    samples, scores = [], []
    for i, (p, t) in enumerate(LENGTHS):
        prompt, completion = torch.randint(0, V, (p,), generator=g), torch.randint(0, V, (t,), generator=g)
        s_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(t)])
        samples.append(
            RolloutSample(i, 0, prompt, completion, s_ids, torch.zeros(t, K), torch.zeros(t), True)
        )
        q = torch.log_softmax(torch.randn(t, V, generator=g, dtype=torch.float64), -1)
        top = q.topk(K, dim=-1)
        scores.append(
            ScoredSequence(
                completion_ids=completion.numpy().astype(np.int32),
                logprobs=q.gather(1, completion[:, None])[:, 0].float().numpy(),
                topk_ids=top.indices.int().numpy(),
                topk_logprobs=top.values.float().numpy(),
                candidate_logprobs=q.gather(1, s_ids).float().numpy(),
                entropy=-(q.exp() * q).sum(-1).float().numpy(),
            )
        )
        scores[-1].full_q = q  # the teacher's whole distribution, for the full-vocabulary row
    return samples, scores


def _reference(policy, batch, name, q_N_V, normalizer):
    """The loss computed the plain way: [N, V] student log-probs, the pure function of the losses module."""
    hidden = batch.packed.hidden_at_completion(
        policy(batch.packed.input_ids_B_L, batch.packed.attention_mask_B_L)
    )
    lp_N_V = torch.log_softmax(policy.head(hidden).float(), -1)
    if name == "sampled_token":
        return losses.sampled_token_loss(
            lp_N_V.gather(1, batch.packed.targets_N[:, None])[:, 0], batch.teacher_logprob_N, None, normalizer
        )
    if name == "student_topk":
        lp = lp_N_V.gather(1, batch.student_topk_ids_N_K)
        return losses.student_topk_loss(lp, batch.teacher_candidate_logprobs_N_K, None, normalizer=normalizer)
    if name == "teacher_topk":
        lp = lp_N_V.gather(1, batch.teacher_topk_ids_N_k)
        return losses.teacher_topk_tail_loss(lp, batch.teacher_topk_logprobs_N_k, None, normalizer=normalizer)
    kl_N = (lp_N_V.exp() * (lp_N_V - q_N_V.float())).sum(-1)
    return losses.full_vocab_loss(kl_N, None, normalizer)


@pytest.mark.parametrize("name", sorted(loss_table.LOSSES))
def test_every_row_equals_its_pure_function_on_full_log_probs(name):
    spec = loss_table.LOSSES[name]
    samples, scores = _case()
    q_N_V = torch.cat([s.full_q for s in scores])
    batch = build_batch(samples, scores, 0, torch.device("cpu"), spec)
    policy, normalizer = TinyPolicy(), 7.0

    def teacher_logits(a, b):
        return q_N_V[a:b].float()

    loss, totals = forward(
        policy,
        batch,
        LossConfig(type=name, top_k=K, chunk_rows=3),
        spec,
        normalizer,
        teacher_logits=teacher_logits,
        vocab_size=V,
    )
    params = list(policy.parameters())
    grads = torch.autograd.grad(loss, params)
    ref = _reference(policy, batch, name, q_N_V, normalizer)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    assert "opd/overlap_ratio" in totals.means()


def test_metrics_only_forward_builds_no_graph():
    samples, scores = _case()
    batch = build_batch(samples, scores, 0, torch.device("cpu"))
    policy = TinyPolicy()
    with torch.no_grad():
        loss, totals = forward(policy, batch, LossConfig(top_k=K), None, 1.0)
    assert loss is None and 0 <= totals.means()["opd/overlap_ratio"] <= 1


@pytest.fixture
def new_row(monkeypatch):
    """A loss added the way a developer adds one: a row in the table, nothing else."""
    spec = loss_table.LossSpec(
        "entropy_matched",
        "test row",
        loss_table.LOSSES["sampled_token"].compute,
        needs=("entropy",),
        teacher_fields=("entropy",),
        min_top_k=2,
    )
    monkeypatch.setitem(loss_table.LOSSES, spec.name, spec)
    return spec


def test_config_validation_reads_the_table(new_row, monkeypatch):
    assert from_dict({"loss": {"type": "entropy_matched", "top_k": 2}}).loss.type == "entropy_matched"
    with pytest.raises(ConfigError, match="loss.top_k=1 must be >= 2 for entropy_matched"):
        from_dict({"loss": {"type": "entropy_matched", "top_k": 1}})
    monkeypatch.setitem(loss_table.LOSSES, new_row.name, dataclasses.replace(new_row, local_teacher=True))
    with pytest.raises(ConfigError, match="loss.type=entropy_matched needs the teacher's whole distribution"):
        from_dict({"loss": {"type": "entropy_matched", "top_k": 2}})
    with pytest.raises(ConfigError, match="choose one of student_topk, .*entropy_matched"):
        from_dict({"loss": {"type": "nope"}})


def test_teacher_check_and_batch_builder_read_the_table(new_row):
    info = ModelInfo(
        model="t",
        backend="vllm",
        max_model_len=64,
        max_top_k=16,
        vocab_size=V,
        model_vocab_size=V,
        tokenizer_fingerprint="fp",
        chat_template=False,
        eos_token_ids=[0],
        capabilities=Capabilities(candidate_ids=True, entropy=False, temperature=False, generate=True),
    )
    assert check_compatibility({"u": info}, "fp", needs=loss_table.LOSSES["student_topk"].needs) == []
    with pytest.raises(TeacherIncompatible, match=r"capabilities.entropy = false"):
        check_compatibility({"u": info}, "fp", needs=new_row.needs)
    samples, scores = _case()
    scores[1].entropy = None
    with pytest.raises(TeacherProtocolError, match="sample 1: the teacher's answer has no entropy"):
        build_batch(samples, scores, 0, torch.device("cpu"), new_row)
    build_batch(
        samples, scores, 0, torch.device("cpu"), loss_table.LOSSES["student_topk"]
    )  # does not read it
