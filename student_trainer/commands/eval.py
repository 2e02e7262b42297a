r"""Accuracy of a model on problems with reference answers (pass@1 over n samples, or greedy).

  student-trainer eval --model runs/sft --data test.jsonl --n 4 --out runs/sft/eval.jsonl
  student-trainer eval --model runs/lab/student --data lab_test.jsonl --greedy --extractor 'last:;' \
      --template '{question}'

Problems are JSONL or parquet records with a question (--question-field, default "question", else
"prompt") and a reference answer (--answer-field, default "answer"). Prompts use the model's chat template
with a generation prompt, or --template, a plain string containing {question}.
Answer extraction (--extractor):
  math            the last \boxed{...} (nested braces, \fbox, "\boxed 5"); LaTeX-aware normalisation and
                  numeric comparison (\dfrac{1}{2} = 1/2 = 0.5, "x = 5" = 5, 1,000 = 1000, 50\% = 50)
  regex:PATTERN   the last match (group 1 if the pattern has a group)
  last:SEP        the text after the last SEP, e.g. 'last:;'
Sampling uses --temperature/--top-p with top-k off; --greedy takes one deterministic sample.
Writes one line per problem to --out (samples, extracted answers, correct flags, pass@1) and prints a
summary: accuracy (mean pass@1), mean generated length, EOS rate, extraction rate.
"""

from __future__ import annotations

import argparse
import json

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory (from_pretrained)")
    p.add_argument("--data", required=True, help="problems (.jsonl or .parquet)")
    p.add_argument("--question-field", help="question field (default: question, else prompt)")
    p.add_argument("--answer-field", default="answer", help="reference answer field")
    p.add_argument("--limit", type=int, help="evaluate only the first LIMIT problems")
    p.add_argument("--n", type=int, default=1, help="samples per problem (pass@1 = mean correctness)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding, one sample")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion budget (default 512)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default 16)")
    p.add_argument("--template", help="plain prompt template with {question} (default: the chat template)")
    p.add_argument("--system-prompt", help="system message for the chat template")
    p.add_argument("--extractor", default="math", help="math (default) | regex:PATTERN | last:SEP")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--out", help="per-problem results (.jsonl)")


def run(args: argparse.Namespace) -> int:
    from student_trainer.evaluate import EvalConfig, evaluate, load_model, load_problems, write_results

    config = EvalConfig(
        n=args.n,
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        template=args.template,
        system_prompt=args.system_prompt,
        extractor=args.extractor,
        seed=args.seed,
        progress=True,
    )
    print(f"eval config: {config}")
    problems = load_problems(args.data, args.question_field, args.answer_field, args.limit)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    report = evaluate(model, tokenizer, problems, config)
    if args.out:
        write_results(report, args.out)
        print(f"results -> {args.out}")
    print(report.summary)
    print(json.dumps(report.summary.as_metrics()))
    return 0
