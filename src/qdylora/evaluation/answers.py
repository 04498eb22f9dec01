"""Answer extraction and comparison for exact-match scoring of generated text."""

from __future__ import annotations

import re
import string
from typing import Optional

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
LEADING_NUMBER = re.compile(r"^\s*\$?(-?\d[\d,]*(?:\.\d+)?)(?:\s|$)")
ARTICLES = re.compile(r"\b(a|an|the)\b")


def _to_float(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def reference_number(reference: str) -> Optional[float]:
    """The number a reference answer states, when it is a plain number first ("9 apples" -> 9,
    "1.35 dollars" -> 1.35); None for text, ratios ("2:3") and fractions ("3/7")."""
    m = LEADING_NUMBER.match(reference)
    return _to_float(m.group(1)) if m else None


def final_number(text: str) -> Optional[float]:
    """The last number in generated text ("7 + 2 = 9 apples" -> 9), as GSM8K-style scoring does."""
    found = NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, reference: str) -> bool:
    """Numbers compare as numbers (the final number of the prediction); other answers compare
    as normalised text of the prediction's first line."""
    expected = reference_number(reference)
    if expected is not None:
        got = final_number(prediction)
        return got is not None and abs(got - expected) <= 1e-6 * max(1.0, abs(expected))
    first_line = prediction.strip().splitlines()[0] if prediction.strip() else ""
    return normalize(first_line) == normalize(reference)
