"""A run's data: rows kept in Arrow, examples tokenized when read, 12 bytes held per row."""

from __future__ import annotations

import json
import tempfile
import tracemalloc

import pytest

from qdylora.data.datasets import load_data
from qdylora.data.rows import RowFormat, Rows, TokenizedRows, read_rows, rows_fingerprint, split_rows, tokenize
from qdylora.data.settings import DataSettings

from ..conftest import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_rows(path, n, long_every=0):
    with open(path, "w") as f:
        for i in range(n):
            output = "" if long_every and i % long_every == 0 else str(i % 97)
            f.write(json.dumps({"input": f"{i}+{i}=", "output": output, "note": "x" * (i % 5)}) + "\n")
    return str(path)


def test_examples_read_lazily_equal_the_whole_tokenization(tmp_path, tok):
    """Training and validation examples, their counts and fingerprints are what tokenizing
    the split rows up front gives (rows of an empty response only get EOS: kept)."""
    settings = DataSettings(data=write_rows(tmp_path / "d.jsonl", 300, long_every=7), val_fraction=0.1,
                            max_source_length=5, max_target_length=2)
    data = load_data(settings, seed=3, tokenizer=tok)
    rows = list(read_rows(settings.data))
    train_idx, val_idx = split_rows(rows, 0.1, settings.val_max_examples, seed=3)
    rf = RowFormat("input-output")
    for got, idx, name in ((data.train, train_idx, "train"), (data.val, val_idx, "validation")):
        want, stats = tokenize([rows[i] for i in idx], tok, rf, max_source_length=5, max_target_length=2)
        assert isinstance(got, TokenizedRows)
        assert [(e.input_ids, e.labels) for e in (got[i] for i in range(len(got)))] == \
               [(e.input_ids, e.labels) for e in want]
        assert list(got.lengths) == [len(e) for e in want]
        assert str(data.stats[name]) == str(stats) and stats.truncated_prompt > 0
        assert data.fingerprint[name] == rows_fingerprint(rows[i] for i in idx)


def test_memory_held_per_row_is_a_few_bytes(tmp_path, tok):
    """What `load_data` keeps grows by about 12 bytes a row (a row number and a length), not by
    each example's token lists (about 1.3 KB a row before: 1.86 GB for 1e6 one-line rows)."""
    n = 20_000
    settings = DataSettings(data=write_rows(tmp_path / "d.jsonl", n), val_fraction=0.01)
    load_data(DataSettings(data=write_rows(tmp_path / "warm.jsonl", 10)), seed=0, tokenizer=tok)  # imports
    tracemalloc.start()
    try:
        data = load_data(settings, seed=0, tokenizer=tok)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data.train) == n - 200
    assert held / n < 64, f"{held / n:.0f} bytes held a row"


def test_rows_read_from_files_stay_readable_and_leave_nothing(tmp_path, monkeypatch):
    """The Arrow tables are memory-mapped from a private cache that is removed at once; rows of
    several files read as one sequence, each with its own fields."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"q": str(i)}) + "\n" for i in range(3)))
    (data / "b.jsonl").write_text(json.dumps({"q": "x", "extra": 1}) + "\n")
    rows = read_rows(str(data))
    assert list((tmp_path / "tmp").iterdir()) == []
    assert isinstance(rows, Rows) and len(rows) == 4
    assert [rows[i] for i in range(4)] == list(rows) == [{"q": "0"}, {"q": "1"}, {"q": "2"}, {"q": "x", "extra": 1}]
    assert rows[-1] == {"q": "x", "extra": 1} and rows[1:3] == [{"q": "1"}, {"q": "2"}]
    with pytest.raises(IndexError):
        rows[4]
