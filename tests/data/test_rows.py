"""Reading rows, detecting formats, tokenizing with loss masks, counting truncation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdylora.data.rows import (IGNORE, RowFormat, chat_segments, detect_format, read_rows, segments_of, split_rows,
                               tokenize)
from qdylora.errors import QDyLoRAError

from ..conftest import char_tokenizer

ROWS = [{"question": "1+2=", "answer": "3"}, {"question": "4+4=", "answer": "8"}]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def loss_text(tok, example) -> str:
    """The text of the tokens under loss."""
    return tok.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE])


@pytest.mark.parametrize("ext", ["json", "jsonl", "csv", "parquet"])
def test_read_rows_from_every_file_type(ext, tmp_path):
    import pandas as pd

    path = tmp_path / f"rows.{ext}"
    frame = pd.DataFrame(ROWS)
    {"json": lambda: path.write_text(json.dumps(ROWS)),
     "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     "csv": lambda: frame.to_csv(path, index=False),
     "parquet": lambda: frame.to_parquet(path)}[ext]()
    rows = read_rows(str(path))
    assert [(r["question"], str(r["answer"])) for r in rows] == [(r["question"], r["answer"]) for r in ROWS]


def test_read_rows_errors(tmp_path):
    with pytest.raises(QDyLoRAError, match="does not exist"):
        read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(QDyLoRAError, match="unsupported type .txt"):
        read_rows(str(tmp_path / "rows.txt"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(QDyLoRAError, match="cannot read data"):
        read_rows(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.csv", ""),
                                           ("empty.json", "  ")])
def test_an_empty_data_file_is_named(tmp_path, name, content):
    """datasets said "StopIteration" or "An error occurred while generating the dataset"."""
    (tmp_path / name).write_text(content)
    with pytest.raises(QDyLoRAError, match=f"data file .*{name} is empty"):
        read_rows(str(tmp_path / name))


@pytest.mark.parametrize("columns, fmt", [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output"], "alpaca"),
    (["input", "output"], "input-output"),
    (["messages"], "chat"),
    (["conversations"], "chat"),
    (["text", "meta"], "text"),
])
def test_detect_format(columns, fmt):
    assert detect_format(columns, "d") == fmt


def test_detect_format_names_the_fields():
    with pytest.raises(QDyLoRAError, match=r"\(answer, question\).*--prompt-template"):
        detect_format(["question", "answer"], "d")


def test_template_masks_the_prompt_and_appends_eos(tok):
    examples, stats = tokenize(ROWS, tok, RowFormat("template", "Q: {question}", "{answer}"))
    assert [tok.decode(e.input_ids) for e in examples] == ["Q: 1+2=3</s>", "Q: 4+4=8</s>"]
    assert [loss_text(tok, e) for e in examples] == ["3</s>", "8</s>"]
    assert (stats.examples, stats.rows, stats.loss_tokens) == (2, 2, 4)


def test_train_on_prompt_puts_loss_everywhere(tok):
    (e,), _ = tokenize(ROWS[:1], tok, RowFormat("template", "{question}", "{answer}"), train_on_prompt=True)
    assert e.labels == e.input_ids


def test_alpaca_and_input_output(tok):
    (a,), _ = tokenize([{"instruction": "Add", "input": "1 2", "output": "3"}], tok, RowFormat("alpaca"))
    assert "### Instruction:\nAdd" in tok.decode(a.input_ids) and "### Input:\n1 2" in tok.decode(a.input_ids)
    assert loss_text(tok, a) == "3</s>"
    (a,), _ = tokenize([{"instruction": "Add", "output": "3"}], tok, RowFormat("alpaca"))
    assert "### Input" not in tok.decode(a.input_ids)
    (b,), _ = tokenize([{"input": "x=", "output": "y"}], tok, RowFormat("input-output"))
    assert tok.decode(b.input_ids) == "x=y</s>" and loss_text(tok, b) == "y</s>"


def test_alpaca_with_a_chat_template_puts_the_instruction_in_the_user_turn(tok):
    """Stanford Alpaca's preamble stayed inside the user turn (ASDiv alpaca rows: 106 tokens each
    instead of 75)."""
    row = {"instruction": "Add", "input": "1 2", "output": "3"}
    (chat,), _ = tokenize([row], tok, RowFormat("alpaca", chat_template=True))
    text = tok.decode(chat.input_ids)
    assert "Below is an instruction" not in text and "### Instruction" not in text
    assert "<|user|>\nAdd\n\n1 2</s>" in text and loss_text(tok, chat).startswith("3")
    (plain,), _ = tokenize([row], tok, RowFormat("alpaca"))
    assert len(chat.input_ids) < len(plain.input_ids) and "Below is an instruction" in tok.decode(plain.input_ids)


def test_text_format_trains_on_everything(tok):
    (e,), _ = tokenize([{"text": "hello"}], tok, RowFormat("text"))
    assert loss_text(tok, e) == "hello</s>"


def test_chat_masks_only_assistant_turns(tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2?"},
                {"role": "assistant", "content": "two"}]
    (e,), _ = tokenize([{"messages": messages}], tok, RowFormat("chat"))
    assert tok.decode(e.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert loss_text(tok, e) == "yo</s>\ntwo</s>\n"


def test_sharegpt_roles_are_mapped(tok):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    (e,), _ = tokenize([{"conversations": conv}], tok, RowFormat("chat"))
    assert loss_text(tok, e) == "yo</s>\n"


def test_chat_template_on_prompt_response_rows(tok):
    (e,), _ = tokenize(ROWS[:1], tok, RowFormat("template", "{question}", "{answer}", chat_template=True))
    assert tok.decode(e.input_ids) == "<|user|>\n1+2=</s>\n<|assistant|>\n3</s>\n"
    assert loss_text(tok, e) == "3</s>\n"


def test_truncation_is_counted(tok):
    rows = [{"input": "a" * 10, "output": "b" * 10}, {"input": "a", "output": "b"}]
    examples, stats = tokenize(rows, tok, RowFormat("input-output"), max_source_length=4, max_target_length=3)
    assert tok.decode(examples[0].input_ids) == "aaaabbb"  # EOS cut with the response
    assert (stats.truncated_prompt, stats.truncated_response) == (1, 1)
    assert "truncated: 1 prompts, 1 responses" in str(stats)


def test_examples_without_loss_tokens_are_dropped_and_counted(tok):
    rows = [{"messages": [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "only a question"}]}]
    examples, stats = tokenize(rows, tok, RowFormat("chat"), max_source_length=10, max_target_length=5)
    assert examples == []
    assert stats.dropped == {"with no response tokens left": 1, "without an assistant turn": 1}
    assert "dropped: 2" in str(stats)


def test_missing_field_names_row_and_fields(tok):
    rows = [{"question": "1+1=", "answer": "2"}, {"question": "2+2="}]
    with pytest.raises(QDyLoRAError, match=r"row 1 has no answer \(its fields with values: question\)"):
        tokenize(rows, tok, RowFormat("template", "{question}", "{answer}"))
    with pytest.raises(QDyLoRAError, match="row 0 has no output"):
        tokenize([{"input": "x"}], tok, RowFormat("input-output"))


def test_chat_needs_a_chat_template(tok):
    bare = char_tokenizer()
    bare.chat_template = None
    with pytest.raises(QDyLoRAError, match="no chat template"):
        tokenize(ROWS, bare, RowFormat("template", "{question}", "{answer}", chat_template=True))


def test_split_is_deterministic_disjoint_and_capped():
    rows = [{"i": i} for i in range(100)]
    train, val = split_rows(rows, 0.1, 0, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted([*train, *val]) == list(range(100))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again = split_rows(rows, 0.1, 0, seed=3)
    assert (again[0] == train).all() and (again[1] == val).all()
    assert list(split_rows(rows, 0.1, 0, seed=4)[1]) != list(val)
    assert len(split_rows(rows, 0.5, 7, seed=3)[1]) == 7
    assert len(split_rows(rows, 0.0, 0, seed=3)[1]) == 0


def test_embedded_asdiv_splits_are_fixed_and_disjoint():
    from qdylora.data.embedded import asdiv_split

    splits = {name: read_rows(f"asdiv:{name}") for name in ("train", "validation", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 1905, "validation": 100, "test": 300}
    keys = {k: {(r["passage"], r["question"]) for r in v} for k, v in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    assert asdiv_split("test") == splits["test"]  # the same rows on every call
    with pytest.raises(QDyLoRAError, match="splits train, validation and test"):
        read_rows("asdiv:dev")


def test_embedded_default_data_settings():
    from qdylora.training.settings import DataSettings

    d = DataSettings().with_embedded_default()
    assert (d.data, d.val_data, d.format, d.chat_template) == ("asdiv:train", "asdiv:validation", "template", True)
    assert d.prompt_template == "{passage} {question}" and d.response_template == "{answer}"
    mine = DataSettings(data="x.jsonl")
    assert mine.with_embedded_default() is mine


def test_malformed_json_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n\n{"question": "2+2=", answer\n')
    with pytest.raises(QDyLoRAError, match=r"line 3 is not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('{"a": "1"}\n[1, 2]\n')
    with pytest.raises(QDyLoRAError, match=r"line 2 is a JSON list, not an object"):
        read_rows(str(tmp_path / "list.jsonl"))


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_non_utf8_text_is_named(tmp_path, ext):
    good = '{"question": "1+1=", "answer": "2"}\n' if ext == "jsonl" else "question,answer\n1+1=,2\n"
    bad = '{"question": "caf\xe9", "answer": "2"}\n' if ext == "jsonl" else "caf\xe9,2\n"
    path = tmp_path / f"latin1.{ext}"
    path.write_bytes(good.encode() + bad.encode("latin-1"))
    line = 2 if ext == "jsonl" else 3  # the CSV has a header line
    with pytest.raises(QDyLoRAError, match=rf"line {line} is not UTF-8 text"):
        read_rows(str(path))


@pytest.mark.parametrize("value, kind", [(["a", "b"], "a list"), ({"x": 1}, "an object")])
def test_a_list_or_object_in_a_text_field_is_refused(value, kind):
    """It was rendered as Python's repr ("['a', 'b']") and trained on without a word."""
    rf = RowFormat("template", "{question}", "{answer}")
    with pytest.raises(QDyLoRAError, match=f"row 3: field question holds {kind}, not text"):
        segments_of({"question": value, "answer": "4"}, 3, rf)
    rf = RowFormat("input-output", None, None)
    with pytest.raises(QDyLoRAError, match=f"field output holds {kind}"):
        segments_of({"input": "2+2", "output": value}, 3, rf)


def test_chat_rows_the_template_cannot_render_name_the_row():
    """An assistant turn first, or a role the template rejects, ended in a jinja2 traceback."""
    tok = char_tokenizer()
    with pytest.raises(QDyLoRAError, match="row 5: the conversation starts with an assistant turn"):
        chat_segments(tok, [{"role": "assistant", "content": "4"}], 5)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                         "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                         "{{ m['content'] }}{% endfor %}")
    with pytest.raises(QDyLoRAError, match=r"row 2: .* refuses this conversation \(unknown role tool\); "
                                           "roles: user, tool, assistant"):
        chat_segments(tok, [{"role": "user", "content": "2+2"}, {"role": "tool", "content": "x"},
                            {"role": "assistant", "content": "4"}], 2)


def test_a_huge_row_costs_what_is_kept(tmp_path):
    """A 30 MB single-line row took 4.5 GB of memory before it was truncated. In a real
    process: tokenizing such a row keeps the peak memory near the process's start."""
    script = tmp_path / "huge.py"
    script.write_text("""
import resource, sys
sys.path.insert(0, sys.argv[1])
from tests.conftest import char_tokenizer
from qdylora.data.rows import RowFormat, tokenize
tok = char_tokenizer()
tokenize([{"question": "1+1=", "answer": "2"}], tok, RowFormat("template", "{question}", "{answer}"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = {"question": "x" * 30_000_000, "answer": "y" * 1000}
examples, stats = tokenize([row], tok, RowFormat("template", "{question}", "{answer}"),
                           max_source_length=512, max_target_length=256)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # MiB
assert len(examples[0].input_ids) == 512 + 256 and stats.truncated_prompt == 1 and stats.truncated_response == 1
print(grown)
""")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = float(proc.stdout.strip().splitlines()[-1])
    assert grown < 200, f"tokenizing one 30 MB row grew the process by {grown:.0f} MiB"


def test_a_data_directory_that_mixes_file_types_is_refused(tmp_path):
    """A .jsonl and a .csv in one directory: the .csv rows were dropped without a word."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    (data / "b.csv").write_text("question,answer\n2+2,4\n")
    with pytest.raises(QDyLoRAError, match=r"data directory .* mixes file types \(json: a.jsonl; csv: b.csv\)"):
        read_rows(str(data))
    (data / "b.csv").unlink()
    (data / "c.jsonl").write_text(json.dumps({"question": "2+2", "answer": "4"}) + "\n")
    assert len(read_rows(str(data))) == 2  # one type: every file is read


def test_a_data_directory_is_read_file_by_file_with_its_row_counts(tmp_path, caplog):
    """Every file of the split is read (subfolders too) and counted in the output; files
    `datasets` leaves out of the split are named, not dropped without a word."""
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / "a.jsonl").write_text("".join(json.dumps({"q": str(i)}) + "\n" for i in range(3)))
    (data / "more" / "b.jsonl").write_text(json.dumps({"q": "x"}) + "\n")
    (data / ".hidden.jsonl").write_text(json.dumps({"q": "hidden"}) + "\n")
    with caplog.at_level("INFO", logger="qdylora"):
        rows = read_rows(str(data))
    assert sorted(r["q"] for r in rows) == ["0", "1", "2", "x"]
    assert "4 rows from 2 files: a.jsonl 3, more/b.jsonl 1" in caplog.text
    (data / "test.jsonl").write_text(json.dumps({"q": "t"}) + "\n")  # now the directory is split by name
    with pytest.raises(QDyLoRAError, match=r"has no 'train' split \(its splits: test \(1 files\); a.jsonl, "
                                           r"more/b.jsonl belong to no split.*pass --split NAME"):
        read_rows(str(data))
    caplog.clear()
    with caplog.at_level("INFO", logger="qdylora"):
        assert read_rows(str(data), "test") == [{"q": "t"}]
    assert "not in the 'test' split, not read: a.jsonl, more/b.jsonl" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QDyLoRAError, match="holds no data file"):
        read_rows(str(empty))


def test_a_relative_data_directory_is_read(tmp_path, monkeypatch):
    """`--data d` and `--data ./d` (a directory relative to the working directory) said "no 'train'
    split": `datasets` lists absolute paths, which matched none of the relative ones."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n' * 3)
    monkeypatch.chdir(tmp_path)
    assert len(read_rows("d")) == len(read_rows("./d")) == len(read_rows(str(tmp_path / "d"))) == 3


@pytest.mark.parametrize("name, content, message", [
    ("scalar.json", "5\n", "the file holds a JSON number, not rows"),
    ("dup.jsonl", '{"question": "1+1=", "answer": "2"}\n{"a": 1, "a": 2}\n', "line 2 gives the field 'a' twice"),
    ("ragged.csv", "question,answer\n1+1=,2\n1+2=,3,extra\n", "line 3 has 3 fields, the header 2"),
])
def test_reader_errors_are_one_line_with_the_row(tmp_path, capfd, name, content, message):
    """datasets printed its own "Failed to load JSON from file ..." line before ours, which said
    only "An error occurred while generating the dataset"."""
    from qdylora.cli import main

    path = tmp_path / name
    path.write_text(content)
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = [line for line in capfd.readouterr().err.splitlines() if "kernels" not in line]
    assert code == 2 and err == [f"qdylora: error: cannot read data from {path}: {message}"
                                 + err[0].split(message, 1)[1]], err


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_special_file_as_data_is_not_a_regular_file(tmp_path, special):
    if special == "fifo":
        special = str(tmp_path / "rows.jsonl")
        os.mkfifo(special)
    with pytest.raises(QDyLoRAError, match="is not a regular file"):
        read_rows(special)


def test_a_replaced_file_of_the_same_size_and_mtime_gives_its_new_rows(tmp_path):
    """datasets' cache is keyed on path, size and mtime: a file replaced by `cp -p` or `rsync -a`
    gave the old rows. Nothing is left in datasets' cache either."""
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "1+1=", "answer": "2"}\n')
    stat = path.stat()
    assert read_rows(str(path))[0]["answer"] == "2"
    path.write_text('{"question": "1+1=", "answer": "3"}\n')  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert read_rows(str(path))[0]["answer"] == "3"
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


def test_the_scalar_json_hint_names_a_shape_that_is_read(tmp_path):
    """The hint recommended "one object of lists", which is read as one row of lists and refused;
    the shape it names now, a list of objects, is read."""
    import json

    from qdylora.data.rows import _first_bad_line

    scalar = tmp_path / "scalar.json"
    scalar.write_text("5\n")
    hint = _first_bad_line(scalar)
    assert "list of objects, one per row" in hint and "object of lists" not in hint
    hinted = tmp_path / "rows.json"
    hinted.write_text(json.dumps([{"question": "1+1=", "answer": "2"}, {"question": "1+2=", "answer": "3"}]))
    assert len(read_rows(str(hinted))) == 2


def test_finding_the_bad_line_reads_a_line_at_a_time(tmp_path):
    """The error path of a data file with one bad line held the file 3.4 times over (the bytes,
    the text and its lines: 167 MB for 50 MB); it now reads a line at a time. Python's own
    allocations at their peak (tracemalloc) stay under a tenth of the file (a whole read is 1x)."""
    import json
    import tracemalloc

    from qdylora.data.rows import _first_bad_line

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(60_000):
            f.write(json.dumps({"question": f"what is {i} plus {i}? " + "x" * 60, "answer": str(2 * i)}) + "\n")
        f.write('{"question": "broken", "answer": \n')
    tracemalloc.start()
    try:
        message = _first_bad_line(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message == "line 60001 is not valid JSON (Expecting value at column 34)"
    assert peak < 0.1 * path.stat().st_size, (peak, path.stat().st_size)
