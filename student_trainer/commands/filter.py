"""Drop incomplete, degenerate-repetition, empty or too-short rollouts before SFT (the cold-start recipe).

  student-trainer filter rollouts.jsonl --out rollouts.filtered.jsonl

Reads one completion per line (completion, completion_ids, finish_reason, as `generate` writes them) and
applies four filters, printing how many records each one flagged and removed:
  empty       blank completion text
  too_short   fewer than --min-tokens content tokens or --min-chars characters
  incomplete  finish_reason other than "stop" (e.g. "length"); without finish_reason, last id not an EOS id
  repetition  ends with a p-gram (p <= --tail-max-period) repeated >= --tail-min-repeats times covering
              >= --tail-min-span tokens, or more than --max-repeated-fraction of its --ngram-size-token
              windows already occurred earlier in it (defaults: 64, 4, 32, 0.3, 16)
Kept records are written unchanged to --out; removed ones to --removed (default OUT.removed.jsonl) with a
"filter_reasons" list.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rollouts", help="rollouts JSONL")
    p.add_argument("--out", required=True, help="kept rollouts (.jsonl)")
    p.add_argument("--removed", help="removed rollouts with reasons (default: OUT.removed.jsonl)")
    p.add_argument("--min-tokens", type=int, default=1, help="minimum content tokens, EOS excluded")
    p.add_argument("--min-chars", type=int, default=1, help="minimum characters of the stripped text")
    p.add_argument("--keep-incomplete", action="store_true", help="do not drop length-truncated samples")
    p.add_argument("--ngram-size", type=int, default=16, help="window size of the repeated n-gram detector")
    p.add_argument(
        "--max-repeated-fraction", type=float, default=0.3, help="max fraction of repeated n-grams (1 = off)"
    )
    p.add_argument("--tail-min-repeats", type=int, default=4, help="tail loop: min repeats (0 = off)")
    p.add_argument("--tail-min-span", type=int, default=32, help="tail loop: min tokens covered")
    p.add_argument("--tail-max-period", type=int, default=64, help="tail loop: longest pattern checked")
    p.add_argument("--eos-id", type=int, action="append", default=[], help="EOS token id (repeatable)")
    p.add_argument("--tokenizer", help="read the EOS id from this tokenizer directory instead")
    p.add_argument("--text-field", default="completion")
    p.add_argument("--ids-field", default="completion_ids")
    p.add_argument("--finish-field", default="finish_reason")


def run(args: argparse.Namespace) -> int:
    from student_trainer.data.records import read_records, write_jsonl
    from student_trainer.recipe.filters import FilterConfig, filter_rollouts

    eos = list(args.eos_id)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok_eos = AutoTokenizer.from_pretrained(args.tokenizer).eos_token_id
        if tok_eos is not None and tok_eos not in eos:
            eos.append(tok_eos)
    config = FilterConfig(
        min_tokens=args.min_tokens,
        min_chars=args.min_chars,
        drop_incomplete=not args.keep_incomplete,
        ngram_size=args.ngram_size,
        max_repeated_ngram_fraction=args.max_repeated_fraction,
        tail_min_repeats=args.tail_min_repeats,
        tail_min_span=args.tail_min_span,
        tail_max_period=args.tail_max_period,
        eos_token_ids=tuple(eos),
        text_field=args.text_field,
        ids_field=args.ids_field,
        finish_field=args.finish_field,
    )
    print(f"filter config: {config}")
    result = filter_rollouts(read_records(args.rollouts), config)
    out = Path(args.out)
    removed = (
        Path(args.removed)
        if args.removed
        else out.with_name(out.name.removesuffix(".jsonl") + ".removed.jsonl")
    )
    write_jsonl(out, result.kept)
    write_jsonl(removed, result.removed)
    print(result.summary())
    print(f"kept -> {out}\nremoved -> {removed}")
    return 0
