r"""Drop prompts that also appear in a reference set: exact match after normalisation, then semantic match.

  student-trainer dedup prompts.jsonl --reference dapo.jsonl --out prompts.dedup.jsonl \
      --strip-suffix "Please reason step by step, and put your final answer within \boxed{}."

Stage 1 (exact): questions are compared after removing --strip-regex matches and --strip-suffix endings
(case and whitespace ignored), then NFKC + casefold + whitespace collapse.
Stage 2 (semantic): sentence-transformers embeddings (--model, default all-mpnet-base-v2, a hub name or a
local directory), L2-normalised, FAISS inner-product search; a prompt whose cosine similarity to its nearest
reference is >= --threshold (default 0.6, the paper's) is dropped. Needs pip install 'opd-distill[dedup]';
--exact-only skips it.

Inputs are JSONL or parquet; the question is read from --question-field (default: "question", else
"prompt"; a chat message list gives its last user message). Writes the kept records unchanged to --out and
the removed ones to --removed (default: OUT with .removed.jsonl), each with a "dedup" object: stage,
reference_index, nearest_reference, score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", help="prompt set to clean (.jsonl or .parquet)")
    p.add_argument("--reference", required=True, action="append", help="reference set (repeat for several)")
    p.add_argument("--out", required=True, help="kept prompts (.jsonl)")
    p.add_argument(
        "--removed", help="removed prompts with stage/neighbour/score (default: OUT.removed.jsonl)"
    )
    p.add_argument(
        "--question-field", help="question field of the prompt set (default: question, else prompt)"
    )
    p.add_argument("--reference-field", help="question field of the reference set (default: as above)")
    p.add_argument(
        "--strip-suffix", action="append", default=[], help="instruction suffix to remove (repeatable)"
    )
    p.add_argument(
        "--strip-regex", help="regular expression removed wherever it matches, before the suffixes"
    )
    p.add_argument("--threshold", type=float, default=0.6, help="cosine similarity at or above which to drop")
    p.add_argument(
        "--model", default="sentence-transformers/all-mpnet-base-v2", help="embedding model name/path"
    )
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--device", help="embedding device (default: sentence-transformers' choice)")
    p.add_argument("--exact-only", action="store_true", help="stage 1 only (no extra dependencies)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from student_trainer.data.records import read_records, write_jsonl
    from student_trainer.errors import MissingDependencyError
    from student_trainer.recipe.dedup import DedupConfig, dedup

    config = DedupConfig(
        threshold=args.threshold,
        model=args.model,
        batch_size=args.batch_size,
        strip_suffixes=tuple(args.strip_suffix),
        strip_regex=args.strip_regex,
        exact_only=args.exact_only,
        device=args.device,
        progress=not args.no_progress,
    )
    print(f"dedup config: {config}")
    prompts = read_records(args.prompts)
    references = [rec for path in args.reference for rec in read_records(path)]
    try:
        result = dedup(prompts, references, config, args.question_field, args.reference_field)
    except MissingDependencyError as exc:
        print(f"error: {exc}")
        return 2
    out = Path(args.out)
    removed_path = (
        Path(args.removed)
        if args.removed
        else out.with_name(out.name.removesuffix(".jsonl") + ".removed.jsonl")
    )
    write_jsonl(args.out, result.kept)
    write_jsonl(removed_path, result.removed)

    c = result.counts
    print(f"prompts {c['input']} | references {c['references']}")
    print(f"stage 1 exact     removed {c['exact']}")
    if not config.exact_only:
        print(f"stage 2 semantic  removed {c['semantic']} (cosine >= {config.threshold})")
    if result.semantic_scores is not None and len(result.semantic_scores):
        q = np.quantile(result.semantic_scores, [0.5, 0.9, 0.99])
        print(
            f"nearest-reference cosine over stage-2 prompts: median {q[0]:.3f}, p90 {q[1]:.3f}, p99 {q[2]:.3f}"
        )
    print(f"kept {c['kept']} -> {args.out}\nremoved {len(result.removed)} -> {removed_path}")
    return 0
