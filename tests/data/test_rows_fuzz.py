"""Fuzzing the data path: whatever a file holds, reading and tokenizing it either works or
raises a QDyLoRAError (a one-line message), never another exception."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdylora.data.rows import RowFormat, read_rows, tokenize
from qdylora.errors import QDyLoRAError

from ..conftest import char_tokenizer

TOK = char_tokenizer()
text = st.text(max_size=40)
value = st.one_of(text, st.integers(), st.none(), st.booleans(), st.lists(text, max_size=3))
row = st.dictionaries(st.sampled_from(["question", "answer", "instruction", "output", "text", "x"]), value,
                      max_size=4)
line = st.one_of(row.map(json.dumps), st.text(max_size=30), st.just(""), st.just("[1, 2]"))
FORMATS = [RowFormat("template", "{question}", "{answer}"), RowFormat("alpaca"), RowFormat("text"),
           RowFormat("input-output")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, min_size=1, max_size=6), raw=st.binary(max_size=20))
def test_any_jsonl_file_reads_or_fails_with_a_clear_error(tmp_path_factory, lines, raw):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_bytes("\n".join(lines).encode() + (raw if len(lines) % 2 else b""))
    try:
        rows = read_rows(str(path))
    except QDyLoRAError as e:
        assert "\n" not in str(e)
        return
    assert all(isinstance(r, dict) for r in rows)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=5), fmt=st.sampled_from(FORMATS),
       source=st.integers(1, 64), target=st.integers(1, 16))
def test_any_rows_tokenize_or_fail_with_a_clear_error(rows, fmt, source, target):
    try:
        examples, stats = tokenize(rows, TOK, fmt, max_source_length=source, max_target_length=target)
    except QDyLoRAError as e:
        assert "\n" not in str(e)
        return
    assert stats.rows == len(rows) and len(examples) <= len(rows)
    for e in examples:
        assert len(e.input_ids) == len(e.labels) and any(label != -100 for label in e.labels)
