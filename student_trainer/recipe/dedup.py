"""Prompt dedup against a reference set (``student-trainer dedup``): the paper's data hygiene step
(DeepMath deduplicated against DAPO-Math-17K, see docs/OPD.md, section 6 "The recipe").

Stage 1, exact: a question matches a reference question when both are equal after stripping the
configured instruction suffixes / regex and normalising (unicode NFKC, casefold, whitespace collapsed).
Stage 2, semantic (on what stage 1 kept): embed the stripped questions with a sentence-transformers model
(default all-mpnet-base-v2), L2-normalise, find each question's nearest reference with a FAISS
inner-product index (inner product of unit vectors = cosine similarity) and drop it when the similarity is
>= ``threshold`` (default 0.6, the paper's).

Stage 2 needs the optional ``dedup`` extra (sentence-transformers, faiss-cpu), imported only when used;
``exact_only`` works without it.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from student_trainer.data.records import question_text
from student_trainer.errors import ConfigError, DataError, MissingDependencyError

DEFAULT_MODEL = "sentence-transformers/all-mpnet-base-v2"
MISSING_DEPS_MESSAGE = (
    "semantic dedup needs sentence-transformers and faiss-cpu: pip install 'opd-distill[dedup]' "
    "(or run the exact stage only with --exact-only)"
)


# ---------------------------------------------------------------- stage 1: normalisation + exact match


def _suffix_pattern(suffix: str) -> re.Pattern[str]:
    """Match ``suffix`` at the end of a text, ignoring case and the amount/kind of whitespace."""
    words = unicodedata.normalize("NFKC", suffix).split()
    if not words:
        raise ConfigError(f"strip suffix {suffix!r} is empty")
    return re.compile(r"\s*" + r"\s+".join(map(re.escape, words)) + r"\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Stripper:
    """Removes instruction boilerplate: ``regex`` matches anywhere, then ``suffixes`` at the end (repeatedly)."""

    suffixes: tuple[str, ...] = ()
    regex: str | None = None
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", tuple(_suffix_pattern(s) for s in self.suffixes))
        try:
            compiled = re.compile(self.regex) if self.regex else None
        except re.error as exc:
            raise ConfigError(f"strip regex {self.regex!r} is invalid: {exc}") from exc
        object.__setattr__(self, "_regex", compiled)

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFKC", text)
        if self._regex is not None:
            text = self._regex.sub("", text)
        changed = True
        while changed:  # several suffixes may be stacked ("... Put the answer in a box. Think step by step.")
            changed = False
            for pattern in self._patterns:
                stripped = pattern.sub("", text, count=1)
                if stripped != text:
                    text, changed = stripped, True
        return text.strip()


def normalize_question(text: str) -> str:
    """Exact-match key: NFKC, casefold, whitespace collapsed to single spaces, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_matches(query_keys: list[str], reference_keys: list[str]) -> list[int | None]:
    """For each query key, the index of the first reference with the same key, or None."""
    first: dict[str, int] = {}
    for j, key in enumerate(reference_keys):
        first.setdefault(key, j)
    return [first.get(key) for key in query_keys]


# ---------------------------------------------------------------- stage 2: embeddings + nearest neighbour


def _import_optional(module: str):
    """Import an optional dependency of the semantic stage or raise ``MissingDependencyError``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(f"{MISSING_DEPS_MESSAGE} [missing: {module}]") from exc


def require_semantic_deps() -> None:
    """Fail early, before any work, when sentence-transformers or faiss is not installed."""
    for module in ("faiss", "sentence_transformers"):
        _import_optional(module)


def load_encoder(model: str = DEFAULT_MODEL, device: str | None = None):
    """A ``SentenceTransformer`` by hub name or local path; offline failures say what to do."""
    SentenceTransformer = _import_optional("sentence_transformers").SentenceTransformer
    try:
        return SentenceTransformer(model, device=device)
    except OSError as exc:
        raise OSError(
            f"could not load the embedding model {model!r} ({exc}). Pass a local directory with --model, "
            "or allow the download (HF_HUB_OFFLINE unset) once to fill the cache."
        ) from exc


def embed(texts: list[str], encoder: Any, batch_size: int = 64, desc: str = "embed", progress: bool = True):
    """Unit-norm embeddings, float32 (N, D), computed in batches with a tqdm progress bar."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    # chunks of several batches per encode call: sentence-transformers sorts each call by length
    chunk = batch_size * 16
    parts = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), chunk):
            batch = texts[start : start + chunk]
            vectors = encoder.encode(
                batch, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
            parts.append(np.asarray(vectors, dtype=np.float32))
            bar.update(len(batch))
    if not parts:
        # sentence-transformers >= 5 renamed the method (the old name warns)
        dimension = (
            getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
        )
        dim = dimension()
        return np.zeros((0, dim), dtype=np.float32)
    return l2_normalize(np.concatenate(parts))


def l2_normalize(x_N_D: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32 (N, D)."""
    x_N_D = np.asarray(x_N_D, dtype=np.float32)
    norms_N_1 = np.linalg.norm(x_N_D, axis=1, keepdims=True)
    return x_N_D / np.maximum(norms_N_1, 1e-12)


def nearest_faiss(queries_Q_D: np.ndarray, references_R_D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference by inner product with a FAISS ``IndexFlatIP`` (exact search).

    queries_Q_D, references_R_D: unit-norm float32 rows, so scores are cosine similarities.
    Returns (scores_Q float32, indices_Q int64).
    """
    faiss = _import_optional("faiss")
    if references_R_D.shape[0] == 0:
        raise DataError("the reference set is empty")
    index = faiss.IndexFlatIP(references_R_D.shape[1])
    index.add(np.ascontiguousarray(references_R_D, dtype=np.float32))
    scores_Q_1, indices_Q_1 = index.search(np.ascontiguousarray(queries_Q_D, dtype=np.float32), 1)
    return scores_Q_1[:, 0], indices_Q_1[:, 0].astype(np.int64)


def nearest_numpy(
    queries_Q_D: np.ndarray, references_R_D: np.ndarray, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference for ``nearest_faiss``: chunked matmul + argmax. Same inputs and outputs."""
    if references_R_D.shape[0] == 0:
        raise DataError("the reference set is empty")
    scores, indices = [], []
    for start in range(0, queries_Q_D.shape[0], chunk):
        sims_C_R = queries_Q_D[start : start + chunk] @ references_R_D.T
        best_C = sims_C_R.argmax(axis=1)
        indices.append(best_C)
        scores.append(sims_C_R[np.arange(len(best_C)), best_C])
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    return np.concatenate(scores).astype(np.float32), np.concatenate(indices).astype(np.int64)


# ---------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.6  # drop when cosine(question, nearest reference) >= threshold
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    strip_suffixes: tuple[str, ...] = ()
    strip_regex: str | None = None
    exact_only: bool = False
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a cosine similarity in [-1, 1] (got {self.threshold})")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {self.batch_size})")


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    removed: list[
        dict[str, Any]
    ]  # each with a "dedup" dict: stage, reference_index, nearest_reference, score
    counts: dict[str, int]
    # nearest-reference similarity of every question that reached stage 2 (to choose a threshold)
    semantic_scores: np.ndarray | None = None


def _removal(
    record: dict[str, Any], stage: str, ref_index: int, ref_text: str, score: float
) -> dict[str, Any]:
    info = {"stage": stage, "reference_index": ref_index, "nearest_reference": ref_text, "score": score}
    return {**record, "dedup": info}


def dedup(
    queries: list[dict[str, Any]],
    references: list[dict[str, Any]],
    config: DedupConfig | None = None,
    question_field: str | None = None,
    reference_field: str | None = None,
    encoder: Any = None,
) -> DedupResult:
    """Drop the ``queries`` records whose question also appears in ``references`` (exact, then semantic).

    ``encoder``: an already-loaded sentence-transformers model (else ``config.model`` is loaded).
    Kept records are returned unchanged, in input order.
    """
    config = config or DedupConfig()
    if not references:
        raise DataError("the reference set is empty")
    strip = Stripper(config.strip_suffixes, config.strip_regex)
    q_text = [strip(question_text(r, question_field, f"prompt record {i}")) for i, r in enumerate(queries)]
    r_text = [
        strip(question_text(r, reference_field, f"reference record {i}")) for i, r in enumerate(references)
    ]

    exact = exact_matches([normalize_question(t) for t in q_text], [normalize_question(t) for t in r_text])
    removed_at: dict[int, dict[str, Any]] = {}
    for i, j in enumerate(exact):
        if j is not None:
            removed_at[i] = _removal(queries[i], "exact", j, r_text[j], 1.0)
    counts = {"input": len(queries), "references": len(references), "exact": len(removed_at), "semantic": 0}

    semantic_scores = None
    survivors = [i for i in range(len(queries)) if i not in removed_at]
    if not config.exact_only and survivors:
        require_semantic_deps()
        encoder = encoder if encoder is not None else load_encoder(config.model, config.device)
        ref_emb_R_D = embed(r_text, encoder, config.batch_size, "embed references", config.progress)
        q_emb_S_D = embed(
            [q_text[i] for i in survivors], encoder, config.batch_size, "embed prompts", config.progress
        )
        scores_S, nearest_S = nearest_faiss(q_emb_S_D, ref_emb_R_D)
        semantic_scores = scores_S
        for i, score, j in zip(survivors, scores_S.tolist(), nearest_S.tolist(), strict=True):
            if score >= config.threshold:
                removed_at[i] = _removal(queries[i], "semantic", j, r_text[j], score)
                counts["semantic"] += 1

    kept = [r for i, r in enumerate(queries) if i not in removed_at]
    counts["kept"] = len(kept)
    removed = [removed_at[i] for i in sorted(removed_at)]
    return DedupResult(kept, removed, counts, semantic_scores)
