"""Multiple-choice questions scored by log-likelihood, the way lm-evaluation-harness scores them.

Each option is a continuation of the question's prompt; its score is the summed log-probability
of its tokens. `acc` takes the option with the highest score, `acc_norm` the highest score per
character of the option (lm-evaluation-harness's `acc_norm`, which divides by `len(choice)`).

Rows give the question, the options (a list; {"text": [...], "label": [...]} as ARC and
OpenBookQA on the hub; or the "A. ...\\nB. ..." text of common JSONL exports such as MMLU's) and
the answer (an index, a letter, the option's text, or "B. text").
"""

from __future__ import annotations

import contextlib
import re
import string
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..data.rows import IGNORE, Example, prompt_ids
from ..errors import QDyLoRAError
from ..training.losses import batch_losses_at_ranks, padded

QUESTION_FIELDS = ("question", "query", "question_stem", "ctx", "prompt")
OPTION_FIELDS = ("options", "choices", "endings")
ANSWER_FIELDS = ("gold", "answerKey", "label", "answer")  # names that only mean an option first
LETTERS = string.ascii_uppercase
LETTERED = re.compile(r"^\s*\(?([A-Z])[.):]\s+(.*\S)?\s*$")  # "A. text", "(B) text", "C: text"

# lm-evaluation-harness's defaults for a multiple-choice task in the "cloze" style (its ARC,
# OpenBookQA and mmlu_continuation tasks): the question, then each option after " ".
PROMPT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class ChoiceQuestion:
    """One multiple-choice question."""

    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    row: int  # the row's number in its file, for messages


def _field(row: dict, names: Sequence[str], what: str, index: int) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise QDyLoRAError(f"row {index} has no {what} (a field named {' or '.join(names)}): the choice metric "
                       "needs question, options and answer fields")


def parse_options(value: Any, index: int) -> tuple[list[str], list[str]]:
    """(option texts, their letters) of a row's options field."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):  # hub ARC / OpenBookQA
        texts = [str(t) for t in value["text"]]
        labels = [str(x) for x in value.get("label", LETTERS[:len(texts)])]
    elif isinstance(value, (list, tuple)):
        texts, labels = [str(t) for t in value], list(LETTERS[:len(value)])
    elif isinstance(value, str):
        lines = [line for line in value.splitlines() if line.strip()]
        parsed = [LETTERED.match(line) for line in lines]
        if not all(parsed):
            bad = lines[parsed.index(None)]
            raise QDyLoRAError(f"row {index}: option line {bad[:60]!r} is not of the form 'A. text': give the "
                               "options as a list, or one 'A. text' line each")
        labels, texts = [m.group(1) for m in parsed], [m.group(2) or "" for m in parsed]
    else:
        raise QDyLoRAError(f"row {index}: the options are a {type(value).__name__}: give a list of texts "
                           "or 'A. text' lines")
    if len(texts) < 2:
        raise QDyLoRAError(f"row {index} has {len(texts)} option{'s' * (len(texts) != 1)}: a multiple-choice "
                           "question needs at least two")
    return texts, labels


def answer_index(value: Any, texts: list[str], labels: list[str], index: int) -> int:
    """The index of the right option: from an index, a letter, "B. text" or the option's text."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        if 0 <= value < len(texts):
            return value
    elif isinstance(value, str):
        answer = value.strip()
        if answer in labels:
            return labels.index(answer)
        stripped = [t.strip() for t in texts]
        if answer in stripped:
            return stripped.index(answer)
        m = LETTERED.match(answer)
        if m and m.group(1) in labels and (m.group(2) or "") == texts[labels.index(m.group(1))].strip():
            return labels.index(m.group(1))
        if answer.isdigit() and 0 <= int(answer) < len(texts):
            return int(answer)
    raise QDyLoRAError(f"row {index}: the answer {value!r} matches none of its {len(texts)} options "
                       f"({', '.join(labels)}): give an index, a letter or an option's text")


def choice_questions(rows: Sequence[dict], first_row: int = 0) -> list[ChoiceQuestion]:
    """The rows as multiple-choice questions (one-line errors naming the row)."""
    out = []
    for i, row in enumerate(rows):
        index = first_row + i
        question = _field(row, QUESTION_FIELDS, "question", index)
        texts, labels = parse_options(_field(row, OPTION_FIELDS, "options", index), index)
        answer = answer_index(_field(row, ANSWER_FIELDS, "answer", index), texts, labels, index)
        out.append(ChoiceQuestion(str(question).strip(), tuple(texts), answer, index))
    return out


def context_of(q: ChoiceQuestion, shots: Sequence[ChoiceQuestion]) -> str:
    """The plain-text prompt: solved `shots`, then the question (lm-evaluation-harness's layout)."""
    solved = [PROMPT.format(question=s.question) + TARGET_DELIMITER + s.options[s.answer] for s in shots]
    return FEWSHOT_DELIMITER.join([*solved, PROMPT.format(question=q.question)])


def encode_pair(tokenizer, context: str, continuation: str, bos: bool) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness encodes them: spaces at the end of
    the context move to the continuation, the whole text is tokenized once and the context's
    tokens are cut off, so the continuation's tokens are those the model sees in the whole text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if bos else []
    return prefix + ctx, whole[len(ctx):]


def adds_bos(tokenizer) -> bool:
    """True if the tokenizer puts a BOS token first (as training's prompts then start)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def choice_examples(questions: Sequence[ChoiceQuestion], tokenizer, *, chat: bool,
                    shots: Sequence[ChoiceQuestion] = (), max_length: int = 1024) -> list[Example]:
    """One example per (question, option), in order: the prompt (loss off) and the option (loss on).

    Plain prompts follow lm-evaluation-harness (`context_of`, `encode_pair`); with `chat` the
    solved shots are earlier turns, the question is the user's turn and the option is the
    assistant's reply, rendered by the chat template as in training. Longer examples keep their
    last `max_length` tokens."""
    bos = adds_bos(tokenizer)
    solved = [m for s in shots for m in ({"role": "user", "content": s.question},
                                         {"role": "assistant", "content": s.options[s.answer]})]
    out = []
    for q in questions:  # the prompt once per question, each option after it
        if chat:
            chat_ctx = prompt_ids(tokenizer, [*solved, {"role": "user", "content": q.question}], chat=True)
        else:
            context = context_of(q, shots)
        for option in q.options:
            if chat:
                ctx, cont = chat_ctx, tokenizer(option, add_special_tokens=False)["input_ids"]
            else:  # the whole text is tokenized per option, as the harness does
                ctx, cont = encode_pair(tokenizer, context, TARGET_DELIMITER + option, bos)
            if not cont:
                raise QDyLoRAError(f"row {q.row}: an option is empty: every option needs text to score")
            ids = (ctx + cont)[-max_length:]
            n_cont = min(len(cont), len(ids) - 1)  # the first token has no prediction
            out.append(Example(ids, [IGNORE] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]))
    return out


def choice_accuracy(loglik: torch.Tensor, questions: Sequence[ChoiceQuestion]) -> dict[str, float]:
    """{"acc", "acc_norm"} in percent from the options' summed log-likelihoods (one per option,
    in `choice_examples` order). Ties go to the first option, as numpy's argmax does."""
    hits = {"acc": 0, "acc_norm": 0}
    at = 0
    for q in questions:
        ll = loglik[at:at + len(q.options)].double()  # (k,)
        at += len(q.options)
        chars = torch.tensor([float(len(o)) for o in q.options], dtype=torch.float64)  # (k,)
        hits["acc"] += int(_first_argmax(ll) == q.answer)
        hits["acc_norm"] += int(_first_argmax(ll / chars) == q.answer)
    return {k: 100.0 * v / max(len(questions), 1) for k, v in hits.items()}


def _first_argmax(x: torch.Tensor) -> int:
    return int((x == x.max()).nonzero()[0])


def few_shot(rows: Sequence[dict], k: int, shots_rows: Optional[Sequence[dict]]) -> tuple[list[ChoiceQuestion], list[dict], int]:
    """(solved shots, rows left to evaluate, number of the first evaluated row): the first `k`
    rows of `shots_rows` if given, else the first `k` evaluation rows (then not evaluated)."""
    if k < 0:
        raise QDyLoRAError(f"--shots must be 0 or more, got {k}")
    if k == 0:
        return [], list(rows), 0
    if shots_rows is not None:
        if len(shots_rows) < k:
            raise QDyLoRAError(f"{k} shots asked for, but the shots data has {len(shots_rows)} rows")
        return choice_questions(shots_rows[:k]), list(rows), 0
    if len(rows) <= k:
        raise QDyLoRAError(f"{k} shots taken from the evaluation rows leave none of its {len(rows)} rows to "
                           "evaluate: pass --shots-data FILE or fewer shots")
    return choice_questions(rows[:k]), list(rows[k:]), k


def choice_logliks(model: nn.Module, examples: Sequence[Example], ranks: Sequence[int], *, pad_id: int,
                   batch_size: int = 8, rank_batch: int = 0, autocast=contextlib.nullcontext,
                   on_batch=None) -> dict[int, torch.Tensor]:
    """{rank: summed log-likelihood of each example's scored tokens, (N,) float64}, in the order of
    `examples`, every rank in the same rank-batched forward passes (`batch_losses_at_ranks`)."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths together
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    sums = batch_losses_at_ranks(model, padded(([examples[i] for i in b] for b in batches), pad_id, device),
                                 ranks, rank_batch, autocast, on_batch)  # {rank: (N,) in batch order}
    position = torch.tensor([i for b in batches for i in b])  # batch order -> example index
    out = {}
    for r, (loss, _) in sums.items():
        ll = torch.empty(len(examples), dtype=torch.float64)
        ll[position] = -loss
        out[r] = ll
    return out
