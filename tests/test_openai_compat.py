"""The OpenAI/vLLM-compatible surface driven by the field's real clients, against a real `teacher-server`
subprocess (transformers backend, tiny teacher) over HTTP: the openai SDK, TRL's ``VLLMClient``, TRL <= 1.10's
legacy ``/get_sequence_logprobs/`` request, and lm-eval's ``local-completions`` model. Every log-prob is
checked against a plain transformers fp32 forward of the same model in this process (within 1e-5), every
rank against a brute-force count. No mocks.
"""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")

ATOL = 1e-5


@pytest.fixture(scope="module")
def ref(tiny_pair):
    """(model, tokenizer) of the tiny teacher in fp32, and a function: ids -> (L, V) log-probs, row j
    predicting token j (row 0 is NaN: nothing predicts the first token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_pair[0], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])

    @torch.no_grad()
    def logprobs(ids: list[int], temperature: float = 1.0) -> torch.Tensor:
        out = model(torch.tensor([ids])).logits[0].float() / temperature
        lp = out.log_softmax(-1)
        return torch.cat([torch.full_like(lp[:1], float("nan")), lp[:-1]])

    return model, tok, logprobs


@pytest.fixture(scope="module")
def client(hf_teacher):
    return openai.OpenAI(base_url=hf_teacher.url + "/v1", api_key="unused", max_retries=0)


def _rank(row_V: torch.Tensor, token: int) -> int:
    return int((row_V > row_V[token]).sum()) + 1


def _check_entry(entry: dict, row_V: torch.Tensor, actual: int, k: int, tok) -> None:
    """One vLLM prompt_logprobs position: the actual token first with its true rank, then the top-k."""
    keys = list(entry)
    assert keys[0] == str(actual)
    assert entry[str(actual)]["rank"] == _rank(row_V, actual)
    assert entry[str(actual)]["decoded_token"] == tok.decode([actual])
    assert len(entry) in (k, k + 1)
    for key, e in entry.items():
        assert math.isclose(e["logprob"], float(row_V[int(key)]), abs_tol=ATOL)
    by_rank = sorted((e["rank"], e["logprob"]) for e in entry.values())[:k]  # TRL reads them this way
    np.testing.assert_allclose([lp for _, lp in by_rank], row_V.topk(k).values.numpy(), atol=ATOL)


# ------------------------------------------------------------------------------------------- openai SDK


def test_models_list_names_the_served_model(client, hf_teacher, tiny_pair):
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_pair[0])]
    assert models[0].model_extra["max_model_len"] == 256


@pytest.mark.parametrize("max_tokens", [1, 3])  # 1 at T=0: the greedy token is read off the scoring pass
def test_echo_logprobs_text_prompt_match_a_forward(client, ref, tiny_pair, max_tokens):
    model, tok, logprobs = ref
    prompt = "12+34=46\n7+8="
    out = client.completions.create(
        model=str(tiny_pair[0]), prompt=prompt, max_tokens=max_tokens, temperature=0, echo=True, logprobs=3
    )
    choice = out.choices[0]
    lp = choice.logprobs
    prompt_ids = tok(prompt)["input_ids"]
    n_prompt = len(prompt_ids)
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == n_prompt + max_tokens == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    # the sampled tokens are the greedy ones; re-tokenise nothing: rebuild ids from the reference argmax
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        ids.append(int(logprobs(ids + [0])[-1].argmax()))
    full = logprobs(ids)
    assert lp.tokens == [tok.decode([i]) for i in ids]
    for j in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[j], float(full[j, ids[j]]), abs_tol=ATOL)
        top = full[j].topk(3)
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            assert math.isclose(lp.top_logprobs[j][tok.decode([i])], v, abs_tol=ATOL)
    assert out.usage.prompt_tokens == n_prompt and out.usage.completion_tokens == max_tokens
    assert choice.text == prompt + tok.decode(ids[n_prompt:], skip_special_tokens=True)


def test_token_prompts_prompt_logprobs_and_token_ids(client, ref, tiny_pair):
    """A list of id lists (TRL's form) with vLLM's prompt_logprobs and return_token_ids, score only."""
    _, tok, logprobs = ref
    prompts = [[5, 17, 300, 9, 42], [7, 8]]
    out = client.completions.create(
        model=str(tiny_pair[0]),
        prompt=prompts,
        max_tokens=0,
        extra_body={"prompt_logprobs": 4, "return_token_ids": True},
    )
    assert len(out.choices) == 2
    for ids, choice in zip(prompts, out.choices, strict=True):
        extra = choice.model_extra
        assert extra["prompt_token_ids"] == ids and extra["token_ids"] == []
        entries = extra["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        full = logprobs(ids)
        for j in range(1, len(ids)):
            _check_entry(entries[j], full[j], ids[j], 4, tok)
        assert choice.text == "" and choice.finish_reason == "length"


def test_prompt_logprobs_honour_temperature_on_the_hf_backend(client, ref, tiny_pair):
    """vLLM's own server ignores temperature in prompt log-probs; ours returns log_softmax(logits / T)."""
    _, tok, logprobs = ref
    ids = [11, 12, 13, 14]
    out = client.completions.create(
        model=str(tiny_pair[0]), prompt=ids, max_tokens=1, temperature=0.5, extra_body={"prompt_logprobs": 2}
    )
    entries = out.choices[0].model_extra["prompt_logprobs"]
    full = logprobs(ids, temperature=0.5)
    for j in range(1, len(ids)):
        _check_entry(entries[j], full[j], ids[j], 2, tok)
    assert len(out.choices[0].model_extra.get("token_ids") or [1]) == 1


def test_sampling_n_seed_stop_and_stream(client, tiny_pair):
    kw = dict(model=str(tiny_pair[0]), prompt=["1+1=", "2+2="], max_tokens=6, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    ids = client.completions.create(**kw, extra_body={"return_token_ids": True})
    assert ids.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in ids.choices)
    assert all(1 <= len(c.model_extra["token_ids"]) <= 6 for c in ids.choices)
    streamed = list(client.completions.create(**kw, stream=True))
    assert sorted(c.choices[0].text for c in streamed) == sorted(c.text for c in a.choices)
    stop = a.choices[0].text[1:3]
    if stop.strip():
        s = client.completions.create(**kw, stop=[stop])
        assert stop not in s.choices[0].text


def test_errors_have_openai_shape(client, hf_teacher, tiny_pair):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert "gpt-4" in str(e.value) and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(tiny_pair[0]), prompt="x", logprobs=65)
    assert e.value.body["param"] == "logprobs" and "0..64" in e.value.body["message"]
    r = httpx.post(hf_teacher.url + "/v1/completions", json={"prompt": "x", "max_tokns": 3})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "max_tokns" in err["message"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"
    r = httpx.post(hf_teacher.url + "/v1/completions", json={"prompt": [[1, 2, 10**20]]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt[0][2]"
    r = httpx.post(hf_teacher.url + "/v1/completions", json={"prompt": "x", "frequency_penalty": 0.5})
    assert r.status_code == 400 and "frequency_penalty" in r.json()["error"]["message"]
    r = httpx.post(hf_teacher.url + "/v1/completions", json={"prompt": [1] * 250, "max_tokens": 10})
    assert r.status_code == 400 and "maximum context length is 256" in r.json()["error"]["message"]
    # the native surface keeps its own shape
    r = httpx.post(hf_teacher.url + "/v1/score", json={"sequences": []})
    assert r.status_code == 422 and "field" in r.json()["error"]


def test_tokenize_and_detokenize_round_trip(hf_teacher, ref):
    _, tok, _ = ref
    r = httpx.post(hf_teacher.url + "/tokenize", json={"prompt": "hello 123", "add_special_tokens": False})
    assert r.status_code == 200
    doc = r.json()
    assert doc["tokens"] == tok("hello 123", add_special_tokens=False)["input_ids"]
    assert doc["count"] == len(doc["tokens"]) and doc["max_model_len"] == 256
    r = httpx.post(hf_teacher.url + "/detokenize", json={"tokens": doc["tokens"]})
    assert r.json()["prompt"] == "hello 123"


def test_metrics_count_the_compatible_routes(hf_teacher, client, tiny_pair):
    client.completions.create(model=str(tiny_pair[0]), prompt=[1, 2, 3], max_tokens=0, logprobs=0, echo=True)
    text = httpx.get(hf_teacher.url + "/metrics").text
    assert 'endpoint="completions",status="200"' in text
    assert 'endpoint="completions",status="400"' in text or 'endpoint="completions",status="404"' in text


# ---------------------------------------------------------------------------------------------------- TRL


def _sequences(seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 1000, n).tolist() for n in (9, 30, 4)]
    return seqs, [3, 12, 1]


def test_trl_vllm_client_get_sequence_logprobs(hf_teacher, ref):
    """TRL >= 1.11's teacher path: VLLMClient -> GET /v1/models + POST /v1/completions with prompt_logprobs."""
    pytest.importorskip("trl")
    from trl.generation.vllm_client import VLLMClient

    _, _, logprobs = ref
    seqs, plens = _sequences()
    k = 5
    out = VLLMClient(base_url=hf_teacher.url).get_sequence_logprobs(seqs, plens, top_logprobs=k)
    for i, (seq, pl) in enumerate(zip(seqs, plens, strict=True)):
        full = logprobs(seq)
        assert len(out["logprobs"][i]) == len(seq) - pl
        for t, pos in enumerate(range(pl, len(seq))):
            top = full[pos].topk(k)
            np.testing.assert_allclose(out["logprobs"][i][t], top.values.numpy(), atol=ATOL)
            assert math.isclose(out["actual_logprobs"][i][t][0], float(full[pos, seq[pos]]), abs_tol=ATOL)
            assert out["actual_token_ids"][i][t] == [seq[pos]]


def _decode_binary_like_trl_1_10(response: dict) -> dict[str, list]:
    """A transcription of TRL 1.10's ``VLLMClient._decode_binary_logprobs`` (TRL 1.16 no longer has it)."""
    shape = response["shape"]
    comp_lengths = response["completion_lengths"]
    lps = np.frombuffer(base64.b64decode(response["logprobs_b64"]), dtype=np.float32).reshape(shape)
    ids = np.frombuffer(base64.b64decode(response["token_ids_b64"]), dtype=np.int32).reshape(shape)
    a_shape = [shape[0], shape[1], 1]
    a_lps = np.frombuffer(base64.b64decode(response["actual_logprobs_b64"]), dtype=np.float32).reshape(
        a_shape
    )
    a_ids = np.frombuffer(base64.b64decode(response["actual_token_ids_b64"]), dtype=np.int32).reshape(a_shape)
    return {
        "logprobs": [lps[i, :n].tolist() for i, n in enumerate(comp_lengths)],
        "logprob_token_ids": [ids[i, :n].tolist() for i, n in enumerate(comp_lengths)],
        "actual_logprobs": [a_lps[i, :n].tolist() for i, n in enumerate(comp_lengths)],
        "actual_token_ids": [a_ids[i, :n].tolist() for i, n in enumerate(comp_lengths)],
    }


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_trl_legacy_get_sequence_logprobs(hf_teacher, ref, fmt):
    _, _, logprobs = ref
    seqs, plens = _sequences(1)
    seqs.append([4, 5, 6])
    plens.append(0)  # position 0 has no log-prob: an empty row (json) or -inf padding (binary)
    k = 3
    body = {"sequences": seqs, "prompt_lengths": plens, "top_logprobs": k, "response_format": fmt}
    r = httpx.post(hf_teacher.url + "/get_sequence_logprobs/", json=body, timeout=60)
    assert r.status_code == 200, r.text
    doc = _decode_binary_like_trl_1_10(r.json()) if fmt == "binary" else r.json()
    for i, (seq, pl) in enumerate(zip(seqs, plens, strict=True)):
        full = logprobs(seq)
        rows = doc["logprobs"][i]
        assert len(rows) == len(seq) - pl
        for t, pos in enumerate(range(pl, len(seq))):
            if pos == 0:
                assert rows[t] == [] if fmt == "json" else all(v == -math.inf for v in rows[t])
                continue
            top = full[pos].topk(k)
            np.testing.assert_allclose(rows[t][:k], top.values.numpy(), atol=ATOL)
            ids = doc["logprob_token_ids"][i][t]
            np.testing.assert_allclose([float(full[pos, j]) for j in ids[:k]], top.values.numpy(), atol=ATOL)
            if fmt == "json":  # vLLM's rank-sorted dict: the actual token follows when outside the top-k
                assert (seq[pos] in ids[:k]) == (len(ids) == k)
                assert ids[-1] == seq[pos] or seq[pos] in ids[:k]
            else:
                assert math.isclose(doc["actual_logprobs"][i][t][0], float(full[pos, seq[pos]]), abs_tol=ATOL)
                assert doc["actual_token_ids"][i][t] == [seq[pos]]


def test_trl_legacy_errors(hf_teacher):
    bad = {"sequences": [[1, 2, 3]], "prompt_lengths": [5]}
    r = httpx.post(hf_teacher.url + "/get_sequence_logprobs/", json=bad)
    assert r.status_code == 400 and "prompt_lengths[0]=5" in r.json()["error"]["message"]
    r = httpx.post(
        hf_teacher.url + "/get_sequence_logprobs/", json={"sequences": [[1, 2]], "prompt_lengths": [1]}
    )
    assert r.status_code == 400 and "--max-top-k 100" in r.json()["error"]["message"]  # TRL's default k=100


# ------------------------------------------------------------------------------------------------ lm-eval


def test_lm_eval_local_completions_loglikelihood_and_generate(hf_teacher, ref, tiny_pair):
    """lm-eval's own model class, offline: loglikelihood sums token_logprobs[ctxlen:-1] of an echoed prompt
    plus one generated token; generate_until reads choices[].text."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    _, tok, logprobs = ref
    lm = LocalCompletionsAPI(
        base_url=hf_teacher.url + "/v1/completions",
        model=str(tiny_pair[0]),
        tokenizer_backend="huggingface",
        tokenizer=str(tiny_pair[0]),
        num_concurrent=1,
        max_retries=1,
    )
    pairs = [("12+34=", "46"), ("The answer is", " 7")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
        ids = ctx_ids + cont_ids
        full = logprobs(ids)
        want = sum(float(full[len(ctx_ids) + t, c]) for t, c in enumerate(cont_ids))
        assert math.isclose(ll, want, abs_tol=1e-4)
        want_greedy = all(int(full[len(ctx_ids) + t].argmax()) == c for t, c in enumerate(cont_ids))
        assert greedy == want_greedy
    gen = lm.generate_until(
        [Instance("generate_until", {}, ("1+1=", {"until": ["\n"], "max_gen_toks": 5}), 0)]
    )
    ids = tok("1+1=", add_special_tokens=False)["input_ids"]
    for _ in range(5):
        ids.append(int(logprobs(ids + [0])[-1].argmax()))
    want = tok.decode(
        ids[len(tok("1+1=", add_special_tokens=False)["input_ids"]) :], skip_special_tokens=True
    )
    assert gen[0] == want.split("\n")[0]
