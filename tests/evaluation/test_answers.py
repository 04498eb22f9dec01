"""Answer extraction for exact match."""

from __future__ import annotations

import pytest

from qdylora.evaluation.answers import final_number, is_correct, normalize, reference_number


@pytest.mark.parametrize("reference, number", [
    ("9 apples", 9.0), ("1.35 dollars", 1.35), ("383", 383.0), ("1,200 people", 1200.0),
    ("-4 degrees", -4.0), ("Mrs. Hilt", None), ("2:3", None), ("3/7", None), ("Yes", None),
])
def test_reference_number(reference, number):
    assert reference_number(reference) == number


def test_final_number_is_the_last_one():
    assert final_number("7 + 2 = 9 apples") == 9.0
    assert final_number("It costs $1,250.50.") == 1250.5
    assert final_number("no digits") is None


@pytest.mark.parametrize("prediction, reference, ok", [
    ("9 apples", "9 apples", True),
    ("There are 9 apples.", "9 apples", True),
    ("9.0", "9 apples", True),
    ("8 apples", "9 apples", False),
    ("I don't know", "9 apples", False),
    ("mrs hilt", "Mrs. Hilt", True),
    ("The Cooper wedding.\nBecause...", "The Cooper wedding", True),
    ("2:3", "2:3", True),
    ("3:2", "2:3", False),
    ("", "Yes", False),
])
def test_is_correct(prediction, reference, ok):
    assert is_correct(prediction, reference) is ok


def test_normalize():
    assert normalize("  The  Quick, brown fox! ") == "quick brown fox"
