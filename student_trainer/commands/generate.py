r"""Teacher rollouts through POST /v1/generate: the data of the off-policy cold start (then filter, then sft).

  student-trainer generate --teacher-url http://gpu:8000 --data prompts.jsonl --out rollouts.jsonl \
      --n 4 --concurrency 16
  student-trainer generate ... --template $'Question: {question}\nAnswer:'   # plain text (bash $'..' for \n)
  student-trainer generate ... --tokenizer runs/student                      # render here, send token ids

Defaults are the paper's: temperature 0.7, max 12,288 new tokens (capped to the teacher's max_model_len).
Prompts (--template): "chat" sends chat messages that the server renders with the TEACHER's chat template;
a string with {question} is sent as text; with --tokenizer DIR the prompt is rendered here with that
tokenizer (its chat template, or the plain template) and sent as token ids, which `sft` then uses verbatim.
--chat-template-kwargs '{"enable_thinking": false}' sets chat template variables (either side renders them).
Each prompt is one request of --n samples; --concurrency requests are in flight (spread over the URLs).
With --seed S, prompt row r is sampled with seed S + r (reproducible on the hf backend).

Output JSONL, one line per sample, appended as each prompt completes: prompt_id, sample_index, question,
answer (with --answer-field), the prompt as sent (messages | prompt | prompt_ids), completion,
completion_ids (EOS included when the teacher stopped), finish_reason, cumulative_logprob, num_tokens,
sample_seed and "teacher" (model, backend, urls, tokenizer_fingerprint, template, sampling).
Resumable: re-running with the same --out skips prompt ids already complete there (use --id-field for ids
that survive a reordered prompt file) and refuses different settings. Next: `student-trainer filter`.
"""

from __future__ import annotations

import argparse
import os

from student_trainer.commands.sft import json_object

HELP = __doc__


def add_arguments(p: argparse.ArgumentParser) -> None:
    from student_trainer.recipe.generate import PAPER_MAX_TOKENS

    p.add_argument("--teacher-url", action="append", required=True, help="teacher endpoint (repeatable)")
    p.add_argument("--data", required=True, help="prompts: .jsonl, .parquet or a datasets name/directory")
    p.add_argument("--out", required=True, help="output JSONL (appended to; existing prompt ids are skipped)")
    p.add_argument("--question-field", default="question")
    p.add_argument("--answer-field", help="copy this field into each record as 'answer' (e.g. answer)")
    p.add_argument("--id-field", help="stable prompt id field (default: the row index)")
    p.add_argument("--split", default="train", help="split of a datasets source")
    p.add_argument(
        "--template", default="chat", help="'chat' (teacher's chat template) or a {question} string"
    )
    p.add_argument("--system-prompt", help="system message in the chat form")
    p.add_argument(
        "--chat-template-kwargs",
        type=json_object,
        metavar="JSON",
        help="chat template variables for the chat form, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument("--tokenizer", help="render prompts with this local tokenizer and send token ids")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="default 0.7 (paper)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=PAPER_MAX_TOKENS,
        help=f"new tokens per sample (default {PAPER_MAX_TOKENS})",
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt row r uses seed + r (-1: unseeded)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight in total (default 8)")
    p.add_argument("--limit", type=int, help="only the first LIMIT prompts")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for one request (default 3600)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from student_trainer.data.prompts import load_prompts
    from student_trainer.errors import TrainerError
    from student_trainer.recipe.generate import GenerateError, GenerateSettings, generate_to_file
    from student_trainer.teacher.errors import TeacherError

    try:
        settings = GenerateSettings(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=None if args.seed < 0 else args.seed,
            template=args.template,
            system_prompt=args.system_prompt,
            stop=tuple(args.stop),
            concurrency=args.concurrency,
            chat_template_kwargs=args.chat_template_kwargs,
        )
        if args.limit is not None and args.limit < 1:
            raise GenerateError(f"--limit {args.limit} must be >= 1")
        table = load_prompts(
            args.data,
            question_field=args.question_field,
            answer_field=args.answer_field,
            id_field=args.id_field,
            split=args.split,
        )
    except TrainerError as exc:
        print(f"student-trainer generate: {exc}")
        return 2
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = range(min(args.limit, len(table))) if args.limit else None
    print(f"generate: {settings}; {len(table)} prompts from {args.data} -> {args.out}")
    try:
        summary = generate_to_file(
            args.teacher_url,
            table,
            settings,
            args.out,
            api_key=os.environ.get("TEACHER_API_KEY"),
            tokenizer=tokenizer,
            rows=rows,
            progress=not args.no_progress,
            timeout_s=args.timeout,
        )
    except TeacherError as exc:
        print(
            f"student-trainer generate: teacher error: {exc}\n(completed prompts are saved; re-run to resume)"
        )
        return 3
    except TrainerError as exc:
        print(f"student-trainer generate: {exc}")
        return 2
    print(summary)
    print(f"next: student-trainer filter {args.out} --out <kept.jsonl>")
    return 0
