"""The mini-lab's synthetic world: a + b in two "thinking patterns", a character tokenizer, answer checking.

    tok = build_tokenizer()                         # a real PreTrainedTokenizerFast (save_pretrained works)
    problems = sample_problems(random.Random(0), digits=3, count=100)
    problems[0].question                            # "345+278="
    format_a(problems[0])                           # "5+8+0=13;4+7+1=12;3+2+1=06;623"
    format_b(problems[0])                           # "3+2=05;4+7=11;5+8=13;623"

Both formats end with the answer after the last ``;`` (extractor ``last:;`` of student_trainer.evaluate.answers):
format A works right to left with the carry written in every column; format B writes the column sums left
to right and resolves all the carries at once in the answer. The same problems, two incompatible ways of
thinking about them: the paper's "thinking patterns" in miniature.

Prompt templates. The question text is the prompt itself ("345+278="). The student is trained on the plain
template ``{question}``; the teachers were trained on ``<bos>{question}`` (TEACHER_TEMPLATE). Templates are
tokenized with ``add_special_tokens=False`` everywhere (prompts.py, evaluate.py, the teacher server), and the
tokenizer has no post-processor, so a BOS appears exactly when a template writes ``<bos>``: the only place
BOS is decided is the template string. Sending the teacher its own template is the "teacher-aligned
prompt" of the paper, measured by the lab.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from student_trainer.errors import ConfigError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARS = "0123456789+=;"
VOCAB = [PAD, BOS, EOS, *CHARS]  # 16 ids: a student top-16 covers the whole vocabulary
STUDENT_TEMPLATE = "{question}"
TEACHER_TEMPLATE = BOS + "{question}"
FORMATS = ("A", "B")


class WorldError(ConfigError):
    """A bad lab input; the message names the value and the allowed range."""


@dataclass(frozen=True)
class Problem:
    """a + b with operands of ``digits`` digits each (no leading zero, except the 1-digit 0)."""

    a: int
    b: int
    digits: int

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


# ------------------------------------------------------------------------------------------ tokenizer


def build_tokenizer():
    """The 16-token character tokenizer as a ``PreTrainedTokenizerFast``.

    WordLevel over single characters (a regex pre-tokenizer isolates each character; ``<bos>``/``<eos>``/
    ``<pad>`` are special added tokens, matched whole in text); the Fuse decoder joins tokens without spaces.
    A character outside the vocabulary fails in the tokenizer (WordLevel has no unknown token).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=128
    )
    ids = [fast.convert_tokens_to_ids(t) for t in VOCAB]
    if ids != list(range(len(VOCAB))):  # the special tokens must keep their WordLevel ids
        raise RuntimeError(f"tokenizer ids {ids} differ from the vocabulary order 0..{len(VOCAB) - 1}")
    return fast


# ------------------------------------------------------------------------------------------- problems


def check_digits(digits: int) -> None:
    if not 1 <= digits <= 6:
        raise WorldError(f"digits={digits} is outside 1..6 (operand length of the lab's additions)")


def random_problem(rng: random.Random, digits: int) -> Problem:
    check_digits(digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    high = 10**digits - 1
    return Problem(rng.randint(low, high), rng.randint(low, high), digits)


def sample_problems(
    rng: random.Random, digits: int, count: int, exclude: Iterable[Problem] = ()
) -> list[Problem]:
    """``count`` distinct random problems of ``digits`` digits, none of them in ``exclude``."""
    check_digits(digits)
    space = (10 if digits == 1 else 9 * 10 ** (digits - 1)) ** 2
    banned = {(p.a, p.b) for p in exclude}
    if count < 0 or count > space - len(banned):
        raise WorldError(f"count={count}: only {space - len(banned)} distinct {digits}-digit problems left")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < count:
        p = random_problem(rng, digits)
        if (p.a, p.b) not in banned and (p.a, p.b) not in seen:
            seen.add((p.a, p.b))
            out.append(p)
    return out


def mixed_problems(rng: random.Random, mix: dict[int, float], count: int) -> list[Problem]:
    """``count`` problems whose operand lengths follow ``mix`` ({digits: weight}); repeats allowed."""
    if not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise WorldError(f"mix={mix}: give positive weights per digit count, e.g. {{2: 1, 3: 2}}")
    lengths, weights = list(mix), list(mix.values())
    return [random_problem(rng, rng.choices(lengths, weights)[0]) for _ in range(count)]


# -------------------------------------------------------------------------------------------- formats


def _columns(p: Problem) -> list[tuple[int, int]]:
    """Digit pairs from the most significant column to the least."""
    return list(zip(map(int, f"{p.a:0{p.digits}d}"), map(int, f"{p.b:0{p.digits}d}"), strict=True))


def format_a(p: Problem) -> str:
    """Right to left with explicit carry: ``345+278=`` -> ``5+8+0=13;4+7+1=12;3+2+1=06;623``."""
    parts, carry = [], 0
    for x, y in reversed(_columns(p)):
        s = x + y + carry
        parts.append(f"{x}+{y}+{carry}={s:02d}")
        carry = s // 10
    return ";".join(parts) + ";" + p.answer


def format_b(p: Problem) -> str:
    """Left to right column sums, carries resolved only in the answer: ``3+2=05;4+7=11;5+8=13;623``."""
    return ";".join(f"{x}+{y}={x + y:02d}" for x, y in _columns(p)) + ";" + p.answer


def completion(p: Problem, fmt: str) -> str:
    if fmt not in FORMATS:
        raise WorldError(f"format={fmt!r}: use one of {FORMATS}")
    return format_a(p) if fmt == "A" else format_b(p)


def answer_of(text: str) -> str | None:
    """The text after the last ``;`` (what extractor ``last:;`` returns), None when there is none."""
    if ";" not in text:
        return None
    ans = text.rsplit(";", 1)[1].strip()
    return ans or None


def follows_format(p: Problem, text: str, fmt: str) -> bool:
    """True when ``text`` is exactly the format's derivation of ``p`` (right answer included)."""
    return text == completion(p, fmt)


# -------------------------------------------------------------------------------------------- files


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def problem_records(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    """Prompt/eval records: ``question``, ``answer`` (a string, for ``last:;``) and ``digits``."""
    return [{"question": p.question, "answer": p.answer, "digits": p.digits} for p in problems]


def sft_records(problems: Iterable[Problem], fmt: str) -> list[dict[str, Any]]:
    """SFT records in the shape ``student_trainer.recipe.sft`` reads: ``question`` + ``completion`` text (the
    loader tokenizes it and appends EOS)."""
    return [{"question": p.question, "completion": completion(p, fmt)} for p in problems]


def problems_from_records(records: Iterable[dict[str, Any]]) -> list[Problem]:
    """Inverse of ``problem_records`` (questions of the form ``a+b=``)."""
    out = []
    for r in records:
        q = str(r["question"])
        if not q.endswith("=") or q.count("+") != 1:
            raise WorldError(f"question {q!r} is not of the form 'a+b='")
        a, b = q[:-1].split("+")
        if len(a) != len(b):
            raise WorldError(f"question {q!r}: operands of different lengths")
        out.append(Problem(int(a), int(b), len(a)))
    return out
