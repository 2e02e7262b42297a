"""An in-process teacher (``teacher.local``): for small teachers, and for the full-vocabulary loss, which
needs the teacher's whole distribution (an HTTP teacher sends only top-k).

It produces the same per-sequence scores as the service (``shared.wire.ScoredSequence``) from one
no-grad forward, with the output layer applied in row chunks, and hands its full-vocabulary logits to
``chunked.full_vocab_reverse_kl``. As a :class:`~student_trainer.teacher.base.Teacher` it computes on demand:
``submit`` only records the request, ``result`` runs the forward (in the step's train phase).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.wire import ScoredSequence
from student_trainer.opd.chunked import gather_logprobs, head_logits
from student_trainer.opd.policy import load_causal_lm, pack
from student_trainer.teacher.base import PendingScores, Teacher, TeacherScores
from student_trainer.teacher.errors import TeacherIncompatible

if TYPE_CHECKING:
    from student_trainer.data.prompts import Prompt
    from student_trainer.rollout.base import RolloutBatch


class _OnDemand(PendingScores):
    def __init__(self, compute: Callable[[], TeacherScores]) -> None:
        self._compute = compute

    def wait(self) -> None:
        pass  # computed in result(), on the trainer's device, when the step needs it

    def result(self) -> TeacherScores:
        return self._compute()


class LocalTeacher(Teacher):
    capabilities = {"candidate_ids": True, "entropy": True}

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, chunk_rows: int = 1024) -> None:
        self.model, self.tokenizer = load_causal_lm(path, dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.device = device
        self.chunk_rows = chunk_rows
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.description = f"{path} (in-process)"

    def submit(
        self, prompts: Sequence[Prompt], rollouts: RolloutBatch, top_k: int, *, temperature: float = 1.0
    ) -> PendingScores:
        samples = rollouts.samples
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

        def compute() -> TeacherScores:
            t_prompts = [self.prompt_ids(prompts[s.prompt_index].teacher_fields()) for s in samples]
            completions = [s.completion_ids.tolist() for s in samples]
            hidden_N_H = self.completion_hidden(t_prompts, completions)
            cands = [s.topk_ids.numpy() for s in samples]
            scores = self.score(hidden_N_H, completions, top_k, cands, temperature=temperature)
            return TeacherScores(scores, head_logits(hidden_N_H, self.head, temperature))

        return _OnDemand(compute)

    def prompt_ids(self, teacher_fields: dict[str, Any]) -> list[int]:
        """Token form as is; chat form rendered with THIS teacher's chat template (as the server does)."""
        if "prompt_ids" in teacher_fields:
            return list(teacher_fields["prompt_ids"])
        if not self.has_chat_template:
            raise TeacherIncompatible(
                "data.teacher_prompt='chat' but the local teacher's tokenizer has no chat template; use "
                "teacher_prompt='same' or a {question} string"
            )
        text = self.tokenizer.apply_chat_template(
            teacher_fields["messages"],
            add_generation_prompt=True,
            tokenize=False,
            **(teacher_fields.get("chat_template_kwargs") or {}),
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def completion_hidden(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """(N, H) teacher final hidden states predicting each completion token, rows in sequence order."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        packed = pack(prompts, completions, pad).to(self.device)
        hidden = self.model.base_model(
            input_ids=packed.input_ids_B_L, attention_mask=packed.attention_mask_B_L, use_cache=False
        ).last_hidden_state
        return packed.hidden_at_completion(hidden)

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def vocab_size(self) -> int:
        """The ids its scores are normalised over: the tokenizer's (at most the output layer's rows)."""
        return min(len(self.tokenizer), self.head.weight.shape[0])

    @torch.no_grad()
    def score(
        self,
        hidden_N_H: torch.Tensor,
        completions: list[list[int]],
        top_k: int,
        candidates: list[np.ndarray] | None,
        *,
        temperature: float = 1.0,
    ) -> list[ScoredSequence]:
        """Service-equivalent scores from the teacher's completion hidden states: log_softmax(logits /
        temperature) over the tokenizer's ids (padded output rows excluded, as the hf backend does)."""
        targets = torch.tensor([t for c in completions for t in c], device=self.device)
        ids = targets[:, None]
        if candidates is not None:
            ids = torch.cat([ids, torch.from_numpy(np.concatenate(candidates)).long().to(self.device)], dim=1)
        out = gather_logprobs(
            hidden_N_H,
            self.head,
            ids,
            top_k=top_k,
            want_entropy=True,
            temperature=temperature,
            vocab_size=self.vocab_size,
            chunk_rows=self.chunk_rows,
        )
        lp = out.logprobs_N_M.float().cpu().numpy()
        top_ids = out.topk_ids_N_k.cpu().numpy().astype(np.int32)
        top_lp = out.topk_logprobs_N_k.float().cpu().numpy()
        ent = out.entropy_N.float().cpu().numpy()
        results, start = [], 0
        for c in completions:
            sl = slice(start, start + len(c))
            results.append(
                ScoredSequence(
                    completion_ids=np.asarray(c, np.int32),
                    logprobs=lp[sl, 0],
                    topk_ids=top_ids[sl],
                    topk_logprobs=top_lp[sl],
                    candidate_logprobs=None if candidates is None else lp[sl, 1:],
                    entropy=ent[sl],
                )
            )
            start += len(c)
        return results
