"""The one path from every API surface to the backend: admission control, the backend call, token metrics.

A surface (``api/native.py`` today, OpenAI- or TRL-shaped ones next) translates its own request into a
validated ``ScoreRequest``/``GenerateRequest`` or straight into jobs, calls a function here, and shapes the
:class:`~shared.wire.ScoredSequence` / :class:`~shared.wire.GeneratedSample` results into its response. The
bounded queue, the Prometheus token counters and the capability checks live here only, so no door can
bypass or double-count them.
"""

from __future__ import annotations

from typing import Any

from shared.protocol import GenerateOptions, GenerateRequest, ScoreRequest
from shared.wire import GeneratedSample, ScoredSequence
from teacher_server.errors import APIError
from teacher_server.jobs import ScoreJob
from teacher_server.prepare import generate_jobs, score_jobs
from teacher_server.state import ServerState, require_ready


class Admission:
    """Bounded queue: refuse (503 + Retry-After) instead of growing without limit."""

    def __init__(self, state: ServerState, tokens: int) -> None:
        self.state, self.tokens = state, tokens

    def __enter__(self) -> None:
        s = self.state
        if s.inflight_tokens and s.inflight_tokens + self.tokens > s.config.max_queue_tokens:
            s.metrics.rejected.inc()
            raise APIError(
                503,
                f"server busy: {s.inflight_tokens} tokens queued (limit "
                f"{s.config.max_queue_tokens}); retry shortly",
                type="overloaded",
                value=s.inflight_tokens,
                limit=s.config.max_queue_tokens,
                headers={"Retry-After": "1"},
            )
        s.inflight_tokens += self.tokens
        s.metrics.inflight_tokens.set(s.inflight_tokens)

    def __exit__(self, *exc: Any) -> None:
        self.state.inflight_tokens -= self.tokens
        self.state.metrics.inflight_tokens.set(self.state.inflight_tokens)


# ------------------------------------------------------------------------------------------------ scoring


async def score(state: ServerState, jobs: list[ScoreJob]) -> list[ScoredSequence]:
    """Admit, score and count ``jobs``; one result per job, in order."""
    tokens = sum(j.num_tokens for j in jobs)
    with Admission(state, tokens):
        results = await state.backend.score(jobs)
    scored = sum(len(j.completion_ids) for j in jobs)
    state.metrics.scored_tokens.inc(scored)
    state.metrics.prompt_tokens.inc(tokens - scored)
    return results


def decode_tokens(state: ServerState, results: list[ScoredSequence]) -> None:
    """Fill ``tokens`` (one decoded string per completion token, for people) in place."""
    tok = state.backend.tokenizer
    for r in results:
        r.tokens = tok.batch_decode([[int(i)] for i in r.completion_ids])


async def score_request(state: ServerState, req: ScoreRequest) -> list[ScoredSequence]:
    """A validated score request end to end: jobs (every limit checked), scores, decoded tokens if asked."""
    require_ready(state)
    jobs = score_jobs(req, state.backend.tokenizer, state.limits)
    results = await score(state, jobs)
    if req.return_tokens:
        decode_tokens(state, results)
    return results


# --------------------------------------------------------------------------------------------- generation


def require_generate(state: ServerState) -> None:
    """422 when the backend cannot sample."""
    if not state.backend.capabilities().generate:
        raise APIError(422, f"the {state.backend.name} backend does not generate", type="unsupported")


async def generate(
    state: ServerState, prompts: list[list[int]], params: GenerateOptions
) -> list[list[GeneratedSample]]:
    """Admit, sample and count: ``params.n`` samples per prompt, in prompt order."""
    require_generate(state)
    budget = sum(len(p) + params.max_tokens for p in prompts) * params.n
    with Admission(state, budget):
        samples = await state.backend.generate(prompts, params)
    state.metrics.generated_tokens.inc(sum(len(s.completion_ids) for group in samples for s in group))
    return samples


async def generate_request(
    state: ServerState, req: GenerateRequest
) -> tuple[list[list[int]], list[list[GeneratedSample]]]:
    """A validated generate request end to end: (prompt ids, samples per prompt)."""
    require_ready(state)
    prompts, params = generate_jobs(req, state.backend.tokenizer, state.limits)
    return prompts, await generate(state, prompts, params)
