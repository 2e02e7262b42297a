"""Answer extraction and comparison for evaluation: pluggable checkers chosen by a spec string.

    get_checker("math")          last \\boxed{...} / \\fbox{...}, LaTeX-aware normalisation, numeric equality
    get_checker("regex:<pat>")   last match of <pat> (group 1 if the pattern has a group, else the whole match)
    get_checker("last:<sep>")    the text after the last <sep> (the mini-lab task: "...;<answer>")

A checker is ``extract(completion) -> str | None`` plus ``equal(predicted, reference) -> bool``; ``None``
means "no answer found" and always scores as wrong. New kinds plug in with ``register_checker``.

Math normalisation (``normalize_math``), in order: NFKC and unicode minus; a reference written as
``\\boxed{..}`` is unwrapped; ``$``, ``\\( \\)``, ``\\[ \\]``, ``\\left``/``\\right``, spacing macros (``\\, \\; \\!``)
and ``^\\circ`` are dropped; ``\\text{..}``/``\\mathrm{..}``/``\\textbf{..}``/``\\mbox{..}`` keep their content;
``\\dfrac``/``\\tfrac`` -> ``\\frac``; ``\\frac12`` -> ``\\frac{1}{2}``; ``\\frac{a}{b}`` -> ``a/b`` (operands that are not
atoms get parentheses); a leading ``x =`` (one variable) is dropped; ``%``/``\\%`` are dropped (so "50%" equals
"50", but not "0.5"); thousands separators (``1,000``, ``1{,}000``) are removed only when the whole answer is
one such number, so the tuple "1,2" stays a tuple; all whitespace and one trailing period are removed.
Two answers are equal when the normalised strings match or both parse as numbers (integers, decimals,
scientific notation, ``a/b`` with numeric a, b) within ``rel_tol=1e-6, abs_tol=1e-9`` — so 0.5 == 1/2 but
0.333 != 1/3.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from student_trainer.errors import ConfigError

REL_TOL = 1e-6
ABS_TOL = 1e-9


@dataclass(frozen=True)
class AnswerChecker:
    """``extract`` pulls the answer out of a completion; ``equal`` compares it with a reference answer."""

    name: str
    extract: Callable[[str], str | None]
    equal: Callable[[str, str], bool]

    def score(self, completion: str, reference: str) -> tuple[str | None, bool]:
        """(extracted answer or None, whether it equals ``reference``)."""
        predicted = self.extract(completion)
        return predicted, predicted is not None and self.equal(predicted, reference)


# ---------------------------------------------------------------- brace-aware LaTeX helpers


def _read_group(text: str, start: int) -> tuple[str, int] | None:
    """The balanced ``{...}`` group opening at ``text[start]``: (content, index after the closing brace)."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):  # an escaped brace (\{ or \}) does not count
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None  # unbalanced: the completion was cut off inside the box


def _read_argument(text: str, start: int) -> tuple[str, int] | None:
    """One macro argument at ``start``, skipping spaces: a ``{group}``, a ``\\macro`` or a single character."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] == "{":
        return _read_group(text, i)
    if text[i] == "\\":
        m = re.match(r"\\[A-Za-z]+", text[i:])
        if m:
            return m.group(0), i + m.end()
    return text[i], i + 1


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces kept), or ``\\boxed 5``.

    Returns None when there is no box or the last one is never closed (a truncated completion).
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    start = starts[-1]
    while start < len(text) and text[start].isspace():  # "\boxed {5}" is valid LaTeX too
        start += 1
    if start < len(text) and text[start] == "{":
        group = _read_group(text, start)
        return group[0] if group else None
    # "\boxed 5" form: the rest of the token, up to whitespace, "$" or the end
    m = re.match(r"[^\s$]+", text[start:])
    return m.group(0) if m else None


def _replace_macro_with_args(text: str, macro: str, nargs: int, render: Callable[[list[str]], str]) -> str:
    """Rewrite every ``\\macro{a}{b}`` (arguments possibly brace-less, like ``\\frac12``), innermost last."""
    pattern = re.compile(re.escape(macro) + r"(?![A-Za-z])")
    out, pos = [], 0
    while True:
        m = pattern.search(text, pos)
        if not m:
            out.append(text[pos:])
            return "".join(out)
        args, end = [], m.end()
        for _ in range(nargs):
            arg = _read_argument(text, end)
            if arg is None:
                break
            args.append(arg[0])
            end = arg[1]
        if len(args) < nargs:  # malformed: keep as is
            out.append(text[pos : m.end()])
            pos = m.end()
            continue
        # arguments may contain the macro themselves (\frac{\frac{1}{2}}{3})
        args = [_replace_macro_with_args(a, macro, nargs, render) for a in args]
        out.append(text[pos : m.start()] + render(args))
        pos = end


# ---------------------------------------------------------------- math normalisation

# a signed number/letter run optionally followed by one macro: "2", "-x", "\pi", "2\sqrt{3}"
_ATOM_RE = re.compile(r"^-?[A-Za-z0-9.]*(?:\\[A-Za-z]+(?:\{[^{}]*\})?)?$")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _paren(operand: str) -> str:
    return operand if _ATOM_RE.match(operand) else f"({operand})"


def normalize_math(answer: str) -> str:
    """Canonical string form of a math answer (see the module docstring for the rules)."""
    s = unicodedata.normalize("NFKC", answer).replace("\u2212", "-").strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    for wrapper in ("\\(", "\\)", "\\[", "\\]", "\\displaystyle"):
        s = s.replace(wrapper, "")
    # units written as "\text{ cm}" (leading space inside \text) follow the value: drop them
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s+[A-Za-z ]*\}\s*$", "", s)
    for macro in ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox", "\\operatorname"):
        s = _replace_macro_with_args(s, macro, 1, lambda a: a[0])
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = re.sub(r"\\[,;:! ]", "", s)  # spacing macros
    s = s.replace("{,}", ",").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\sqrt\s*([0-9A-Za-z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}; \sqrt[3]{x} untouched
    s = _replace_macro_with_args(s, "\\frac", 2, lambda a: f"{_paren(a[0].strip())}/{_paren(a[1].strip())}")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[A-Za-z]=(?!=)", "", s)  # "x=5" -> "5" (one variable name, not "x==5")
    if s.endswith("."):
        s = s[:-1]
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


_ARITH_RE = re.compile(r"^[\d.+\-*/()eE]+$")
_ARITH_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _eval_arith(node: ast.AST) -> float:
    """Evaluate a parsed expression made only of numbers, + - * / and unary signs (nothing else runs)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_arith(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
        return _ARITH_OPS[type(node.op)](_eval_arith(node.left), _eval_arith(node.right))
    raise ValueError("not plain arithmetic")


def parse_number(text: str) -> float | None:
    """The value of a normalised answer that is plain arithmetic on numbers: ``12``, ``-0.5``, ``1e-3``,
    ``3/4``, ``(1/2)/3``, ``2*3``; None for anything else (symbols, tuples, intervals, too long)."""
    s = text.replace("\\cdot", "*").replace("\\times", "*")
    if not s or len(s) > 100 or not _ARITH_RE.match(s) or "**" in s or "//" in s:
        return None
    s = re.sub(r"(?<![\d.eE])0+(?=\d)", "", s)  # "007" is not a Python literal; "1e05" stays valid
    try:
        value = _eval_arith(ast.parse(s, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def numbers_close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def math_equal(predicted: str, reference: str) -> bool:
    """Equal after ``normalize_math`` as strings, or numerically within tolerance."""
    p, r = normalize_math(predicted), normalize_math(reference)
    if p == r:
        return p != ""
    pn, rn = parse_number(p), parse_number(r)
    return pn is not None and rn is not None and numbers_close(pn, rn)


def plain_equal(predicted: str, reference: str) -> bool:
    """For synthetic tasks: equal after stripping and collapsing whitespace, or numerically equal."""
    p = " ".join(unicodedata.normalize("NFKC", predicted).split())
    r = " ".join(unicodedata.normalize("NFKC", reference).split())
    if p == r:
        return p != ""
    pn, rn = parse_number(p), parse_number(r)
    return pn is not None and rn is not None and numbers_close(pn, rn)


# ---------------------------------------------------------------- other extractors


def extract_regex(pattern: str) -> Callable[[str], str | None]:
    """Extractor returning the last match of ``pattern`` (its group 1 when it has groups), stripped."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"extractor 'regex:{pattern}': invalid regular expression ({exc})") from exc

    def extract(text: str) -> str | None:
        matches = list(compiled.finditer(text))
        if not matches:
            return None
        m = matches[-1]
        found = m.group(1) if compiled.groups else m.group(0)
        return found.strip() if found is not None else None

    return extract


def extract_after_last(separator: str) -> Callable[[str], str | None]:
    """Extractor returning the stripped text after the last ``separator``; None if absent or empty."""
    if not separator:
        raise ConfigError("extractor 'last:<sep>': the separator is empty (e.g. use 'last:;')")

    def extract(text: str) -> str | None:
        head, sep, tail = text.rpartition(separator)
        tail = tail.strip()
        return tail if sep and tail else None

    return extract


# ---------------------------------------------------------------- registry

# kind -> factory(argument after the colon, "" if none) -> AnswerChecker
_REGISTRY: dict[str, Callable[[str], AnswerChecker]] = {}


def register_checker(kind: str, factory: Callable[[str], AnswerChecker]) -> None:
    """Make ``get_checker("<kind>")`` / ``get_checker("<kind>:<arg>")`` available."""
    _REGISTRY[kind] = factory


def _math_factory(arg: str) -> AnswerChecker:
    if arg:
        raise ConfigError(f"extractor 'math' takes no argument (got 'math:{arg}')")
    return AnswerChecker("math", extract_boxed, math_equal)


register_checker("math", _math_factory)
register_checker("regex", lambda arg: AnswerChecker(f"regex:{arg}", extract_regex(arg), plain_equal))
register_checker("last", lambda arg: AnswerChecker(f"last:{arg}", extract_after_last(arg), plain_equal))


def get_checker(spec: str) -> AnswerChecker:
    """Checker for ``spec``: "math", "regex:<pattern>", "last:<separator>" or a registered kind."""
    kind, _, arg = spec.partition(":")
    if kind not in _REGISTRY:
        raise ConfigError(f"extractor {spec!r}: unknown kind {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind](arg)
