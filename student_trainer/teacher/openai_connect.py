"""A stock OpenAI-compatible vLLM server as the teacher (``teacher.protocol=openai``), checked at connect.

An OpenAI server reports no tokenizer fingerprint and no capabilities, so what ``/v1/model`` tells the opd
client is found out here, on every URL, before training starts:

- the tokenizer: probe strings (ASCII, digits, unicode, whitespace runs, the special tokens) are tokenized by
  the server (``POST /tokenize``) and by the student's tokenizer; any difference, or no ``/tokenize`` (404),
  is refused with :class:`TeacherIncompatible` unless ``teacher.allow_tokenizer_mismatch`` (then a warning);
- the chat template: rendering a probe conversation through ``/tokenize`` (needed by
  ``data.teacher_prompt=chat``, whose prompts the server's template renders as teacher-server would);
- scoring: one short ``/v1/completions`` with ``prompt_logprobs = loss.top_k`` (vLLM caps it at
  ``--max-logprobs``, 20 by default) read back like every later answer;
- the loss and ``rollout.temperature``: ``config.protocol_refusal`` (the loss table's ``needs`` against
  ``config.TEACHER_PROTOCOLS``), also checked when the config is built.

What was found is kept as one :class:`shared.protocol.ModelInfo` per URL (backend ``openai``), so the
teacher is a :class:`~student_trainer.teacher.remote.RemoteTeacher` over :class:`SyncOpenAIClient`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.fingerprint import tokenizer_fingerprint
from shared.protocol import Capabilities, ModelInfo
from student_trainer.config import TEACHER_PROTOCOLS, Config, protocol_refusal
from student_trainer.teacher.connect import client_options
from student_trainer.teacher.errors import TeacherIncompatible, TeacherRequestError
from student_trainer.teacher.openai_client import OpenAIServer, SyncOpenAIClient
from student_trainer.teacher.remote import RemoteTeacher

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. What is 12 + 7?",
    "0123456789 3.14159 -42 1e-6 $100,000 x^2",
    "naïve café — Grüße, 日本語, emoji 🙂",
    "  two  spaces,\ttab,\n\nblank line   trailing  ",
)
PROBE_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
UNVERIFIED = "unverified (OpenAI server: tokenizer not checked)"


def probe_texts(tokenizer: Any) -> list[str]:
    """:data:`PROBE_TEXTS` plus one string of the tokenizer's special tokens (their ids must agree too)."""
    specials = sorted(set(getattr(tokenizer, "all_special_tokens", ())))
    return [*PROBE_TEXTS, *([" ".join(specials)] if specials else [])]


def probe_ids(tokenizer: Any, texts: Sequence[str]) -> dict[str, list[int]]:
    """``text -> ids`` with ``add_special_tokens=False``, as ``POST /tokenize`` is asked."""
    return {text: list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts}


def tokenizer_differences(
    student_ids: Mapping[str, Sequence[int]], teacher_ids: Mapping[str, Sequence[int]]
) -> list[str]:
    """One line per probe text the two sides tokenize differently (the first differing position and ids)."""
    out = []
    for text, mine in student_ids.items():
        theirs = list(teacher_ids.get(text, []))
        mine = list(mine)
        if mine == theirs:
            continue
        same = [a == b for a, b in zip(mine, theirs, strict=False)]  # strict=False: lengths may differ
        at = same.index(False) if False in same else len(same)
        out.append(
            f"{text[:40]!r}: student {len(mine)} ids, teacher {len(theirs)}; first difference at {at}: "
            f"student {mine[at : at + 4]} vs teacher {theirs[at : at + 4]}"
        )
    return out


def connect_openai(cfg: Config, student_tokenizer: Any, warn: Any = print) -> RemoteTeacher:
    """The teacher at ``cfg.teacher.urls`` over the OpenAI protocol, every URL checked (module docstring)."""
    t, lo = cfg.teacher, cfg.loss
    refusal = protocol_refusal("openai", lo.type, cfg.rollout.temperature)
    if refusal:
        raise TeacherIncompatible(refusal)
    client = SyncOpenAIClient(t.urls, **client_options(t))
    try:
        warnings: list[str] = []
        servers = client.servers()
        infos = {
            url: _check_server(client, server, cfg, student_tokenizer, warnings)
            for url, server in servers.items()
        }
    except BaseException:
        client.close()
        raise
    for w in warnings:
        warn(f"warning: {w}")
    return RemoteTeacher(client, infos)


def _check_server(
    client: SyncOpenAIClient, server: OpenAIServer, cfg: Config, tokenizer: Any, warnings: list[str]
) -> ModelInfo:
    url, t = server.url, cfg.teacher
    problem, max_len = _tokenizer_problem(client, url, tokenizer)
    if problem and not t.allow_tokenizer_mismatch:
        raise TeacherIncompatible(
            f"{problem}: on-policy distillation reads the teacher's log-probs at the student's token ids, so "
            "both must share one tokenizer; set teacher.allow_tokenizer_mismatch=true only if you know the "
            "ids agree"
        )
    if problem:
        warnings.append(f"{problem}; continuing because teacher.allow_tokenizer_mismatch=true")
    if client.client.max_model_len is None and max_len is not None:
        client.client.max_model_len = max_len  # /v1/models did not say; /tokenize did
    has_chat = _has_chat_template(client, url, cfg)
    _check_scoring(client, url, tokenizer, cfg.loss.top_k)
    caps = TEACHER_PROTOCOLS["openai"] or frozenset()
    return ModelInfo(
        model=server.model,
        backend="openai",
        max_model_len=server.max_model_len or max_len or 0,  # 0: not reported
        max_top_k=cfg.loss.top_k,  # what the scoring probe verified; vLLM's --max-logprobs is not reported
        vocab_size=len(tokenizer),
        model_vocab_size=len(tokenizer),
        normalized_vocab_size=None,  # vLLM normalises over all output rows; the API does not say how many
        tokenizer_fingerprint=UNVERIFIED if problem else tokenizer_fingerprint(tokenizer),
        chat_template=has_chat,
        eos_token_ids=[],
        capabilities=Capabilities(**{name: name in caps for name in Capabilities.model_fields}),
        limits={"max_request_sequences": t.max_sequences_per_request},
    )


def _tokenizer_problem(client: SyncOpenAIClient, url: str, tokenizer: Any) -> tuple[str | None, int | None]:
    """(what is wrong with the server's tokenizer or None, the max_model_len /tokenize reported)."""
    texts = probe_texts(tokenizer)
    theirs, max_len = {}, None
    for text in texts:
        try:
            doc = client.tokenize(text, url)
        except TeacherRequestError as exc:
            if exc.status in (404, 405):
                return (
                    f"teacher {url} does not serve POST /tokenize (HTTP {exc.status}), so its tokenizer cannot be checked",
                    None,
                )
            raise
        theirs[text] = doc["tokens"]
        max_len = doc.get("max_model_len") if isinstance(doc.get("max_model_len"), int) else max_len
    diffs = tokenizer_differences(probe_ids(tokenizer, texts), theirs)
    if diffs:
        return f"teacher {url} tokenizes differently from the student: " + "; ".join(diffs), max_len
    return None, max_len


def _has_chat_template(client: SyncOpenAIClient, url: str, cfg: Config) -> bool:
    """Whether the server renders chat messages; required by ``data.teacher_prompt=chat``."""
    try:
        client.render_chat(PROBE_CHAT, url)
        return True
    except TeacherRequestError as exc:
        if cfg.data.teacher_prompt == "chat":
            raise TeacherIncompatible(
                f"data.teacher_prompt=chat renders prompts with the teacher's chat template, but teacher {url} "
                f"refused POST /tokenize with messages (HTTP {exc.status}: {exc.message}); give the server a "
                "template (vllm serve --chat-template FILE) or set data.teacher_prompt=same"
            ) from None
        return False


def _check_scoring(client: SyncOpenAIClient, url: str, tokenizer: Any, top_k: int) -> None:
    """One short scoring request at ``prompt_logprobs = top_k`` on ``url``, read like every later one."""
    ids = probe_ids(tokenizer, PROBE_TEXTS[:1])[PROBE_TEXTS[0]]
    try:
        client.score([{"prompt_ids": ids[:1], "completion_ids": ids[1:8]}], top_k=top_k, url=url)
    except TeacherRequestError as exc:
        hint = (
            f"; start the server with --max-logprobs {top_k} or lower loss.top_k"
            if "logprob" in exc.message.lower()
            else ""
        )
        raise TeacherIncompatible(
            f"teacher {url} refused a scoring request (/v1/completions with prompt_logprobs={top_k}): "
            f"HTTP {exc.status}: {exc.message}{hint}"
        ) from None
