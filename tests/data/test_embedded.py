"""The embedded synthetic task: the word cipher is deterministic and consistent."""

from __future__ import annotations

import pytest

from qdylora.data.embedded import CIPHER_SPLITS, CIPHER_WORDS, word_cipher
from qdylora.errors import QDyLoRAError


def codebook(rows):
    """The word -> code pairs the rows imply (fails on a contradiction)."""
    code: dict[str, str] = {}
    for r in rows:
        words = r["question"].removeprefix("Translate: ").removesuffix("\nCode:").split()
        for w, c in zip(words, r["answer"].split(), strict=True):
            assert code.setdefault(w, c) == c, (w, c)
    return code


def test_word_cipher_is_one_fixed_bijection_across_splits():
    assert len(set(CIPHER_WORDS)) == len(CIPHER_WORDS) == 96
    splits = {name: word_cipher(name) for name in CIPHER_SPLITS}
    assert {k: len(v) for k, v in splits.items()} == {k: n for k, (n, _) in CIPHER_SPLITS.items()}
    code = codebook([r for rows in splits.values() for r in rows])
    assert set(code) == set(CIPHER_WORDS)  # every word appears, and the map is one-to-one
    assert len(set(code.values())) == len(code)
    assert word_cipher("test") == splits["test"]  # the same on every call
    assert {r["question"] for r in splits["test"]}.isdisjoint(r["question"] for r in splits["train"])


def test_word_cipher_refuses_an_unknown_split():
    with pytest.raises(QDyLoRAError, match="splits train, validation, test"):
        word_cipher("dev")
