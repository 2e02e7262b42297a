"""Answer extraction and comparison: boxed parsing, LaTeX normalisation, numeric equality, the registry."""

from __future__ import annotations

import pytest

from student_trainer.evaluate.answers import (
    AnswerChecker,
    extract_after_last,
    extract_boxed,
    extract_regex,
    get_checker,
    math_equal,
    normalize_math,
    parse_number,
    plain_equal,
    register_checker,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the LAST box wins
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{x^{2}+\sqrt{y_{1}}}", r"x^{2}+\sqrt{y_{1}}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
        (r"\fbox{7}", "7"),
        (r"so \boxed 5$ done", "5"),  # brace-less form
        (r"\boxed {12}", "12"),  # a space before the brace is valid LaTeX
        (r"\boxed", None),
        (r"\boxed{3", None),  # truncated inside the box
        (r"\boxed{1} and a truncated \boxed{", None),  # the last box is unclosed: no silent fallback
        ("no box here: 42", None),
        (r"\boxedtext{3}", None),  # a different macro
        (r"\boxed{}", ""),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (r"$\dfrac{1}{2}$", "1/2"),
        (r"\tfrac{3}{4}", "3/4"),
        (r"\frac12", "1/2"),
        (r"\frac 3 4", "3/4"),
        (r"\(\frac{1}{2}\)", "1/2"),
        (r"\[ 7 \]", "7"),
        (r"x = \frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
        (r"\frac{1+x}{2}", "(1+x)/2"),
        (r"\frac{\frac{1}{2}}{3}", "(1/2)/3"),
        (r"-\frac{1}{2}", "-1/2"),
        (r"\frac{-1}{2}", "-1/2"),
        (r"\text{(A)}", "(A)"),
        (r"\textbf{5}", "5"),
        (r"5\text{ cm}", "5"),  # a unit after the value
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"1{,}000", "1000"),
        ("1,000,000", "1000000"),
        ("1,2", "1,2"),  # a tuple, not a thousands separator
        (r"50\%", "50"),
        ("50%", "50"),
        ("3.", "3"),
        (r"1\!000", "1000"),
        (r"\sqrt2", r"\sqrt{2}"),
        ("\u22125", "-5"),  # unicode minus
        ("\uff15", "5"),  # full-width digit (NFKC)
        (r"\boxed{\frac{2}{3}}", "2/3"),  # a reference written boxed
        (r"\$ 12", "12"),
        ("  x  =  12  ", "12"),
        ("y=2x+1", "2x+1"),
        ("x==1", "x==1"),
    ],
)
def test_normalize_math(raw, normalised):
    assert normalize_math(raw) == normalised


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12.0),
        ("-0.5", -0.5),
        (".5", 0.5),
        ("1e-3", 0.001),
        ("3/4", 0.75),
        ("(1/2)/3", 1 / 6),
        ("-(3)/4", -0.75),
        ("007", 7.0),
        ("2*3", 6.0),
        ("1/0", None),
        ("(1,2)", None),
        ("x", None),
        (r"\sqrt{2}", None),
        ("2**1000", None),  # no exponentiation: only + - * /
        ("__import__('os')", None),
        ("", None),
    ],
)
def test_parse_number(text, value):
    got = parse_number(text)
    assert got == pytest.approx(value) if value is not None else got is None


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\dfrac{1}{2}"),
        (r"\frac{1}{2}", "0.50"),
        ("x = 3", "3"),
        ("1,000", "1000"),
        (r"50\%", "50"),
        (r"\text{5}", "5"),
        ("5.0", "5"),
        (r"\left(1,2\right)", "(1, 2)"),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
        (r"\dfrac{2\sqrt{3}}{2}", r"\frac{2\sqrt{3}}{2}"),
        ("1e3", "1000"),
        ("\u22123", "-3"),
    ],
)
def test_math_equal_true(pred, ref):
    assert math_equal(pred, ref)
    assert math_equal(ref, pred)  # symmetric


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("0.333", r"\frac{1}{3}"),  # beyond the 1e-6 relative tolerance
        ("2", "3"),
        ("50", "0.5"),  # percent is dropped, not converted
        ("(1,2)", "(2,1)"),
        ("", ""),  # empty never matches
        ("x", "y"),
        ("1/2", "2/1"),
    ],
)
def test_math_equal_false(pred, ref):
    assert not math_equal(pred, ref)


def test_numeric_tolerance_edges():
    assert math_equal("0.1234567", "0.12345670001")  # within 1e-6 relative
    assert not math_equal("0.1234", "0.1235")
    assert math_equal("1000000", "1000000.5")  # relative 5e-7
    assert math_equal("0", "0.0")


def test_regex_extractor():
    extract = extract_regex(r"answer:\s*(-?\d+)")
    assert extract("answer: 3 ... answer: -7 done") == "-7"  # last match, group 1
    assert extract("nothing") is None
    assert extract_regex(r"\d+")("a 1 b 22") == "22"  # no group: whole match
    with pytest.raises(ValueError, match="invalid regular expression"):
        extract_regex("(")


def test_last_separator_extractor():
    extract = extract_after_last(";")
    assert extract("12+30=42;carry 1; 42 ") == "42"
    assert extract("no separator") is None
    assert extract("ends with separator;  ") is None
    with pytest.raises(ValueError, match="separator is empty"):
        extract_after_last("")


def test_plain_equal():
    assert plain_equal(" 42 ", "42")
    assert plain_equal("a  b", "a b")
    assert plain_equal("4.0", "4")
    assert not plain_equal("A", "a")  # synthetic answers are case-sensitive
    assert not plain_equal("", "")


def test_registry_specs_and_scoring():
    math = get_checker("math")
    assert math.score(r"so \boxed{\dfrac{1}{2}}", "0.5") == (r"\dfrac{1}{2}", True)
    assert math.score("no box", "0.5") == (None, False)
    last = get_checker("last:;")
    assert last.score("3+4;7", "7") == ("7", True)
    # a pattern containing ':' keeps everything after the first colon
    rx = get_checker(r"regex:ans:(\d+)")
    assert rx.score("ans:5 ans:6", "6") == ("6", True)
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        get_checker("nope")
    with pytest.raises(ValueError, match="takes no argument"):
        get_checker("math:x")


def test_register_custom_checker():
    register_checker("upper", lambda arg: AnswerChecker("upper", lambda t: t.strip().upper(), str.__eq__))
    assert get_checker("upper").score(" yes ", "YES") == ("YES", True)
