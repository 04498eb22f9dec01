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
import inspect
import re
import string
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..core.allocation import Allocation
from ..core.rank import replicate_for_ranks
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
    ctx, [cont] = encode_options(tokenizer, context, [continuation], bos)
    return ctx, cont


def encode_options(tokenizer, context: str, continuations: Sequence[str],
                   bos: bool) -> tuple[list[int], list[list[int]]]:
    """`encode_pair` of one context and each continuation: the context's ids (tokenized alone, so
    the same for every continuation) and each continuation's ids."""
    n_spaces = len(context) - len(context.rstrip())
    context, spaces = context[:len(context) - n_spaces], context[len(context) - n_spaces:]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    conts = [tokenizer(context + spaces + c, add_special_tokens=False)["input_ids"][len(ctx):]
             for c in continuations]
    return ([tokenizer.bos_token_id] if bos else []) + ctx, conts


def adds_bos(tokenizer) -> bool:
    """True if the tokenizer puts a BOS token first (as training's prompts then start)."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


@dataclass(frozen=True)
class EncodedQuestion:
    """A question's prompt ids, once, and each option's continuation ids (`encode_questions`)."""

    context: list[int]
    options: tuple[list[int], ...]
    max_length: int  # longer examples keep their last max_length tokens

    def examples(self) -> list[Example]:
        """One example per option: the prompt (loss off), then the option (loss on)."""
        out = []
        for cont in self.options:
            ids = (self.context + cont)[-self.max_length:]
            n_cont = min(len(cont), len(ids) - 1)  # the first token has no prediction
            out.append(Example(ids, [IGNORE] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]))
        return out

    @property
    def packed_length(self) -> int:
        """Tokens of the prompt and all options in one row (`choice_logliks_shared`)."""
        return len(self.context) + sum(map(len, self.options))

    @property
    def shareable(self) -> bool:
        """True if every option is scored whole after the whole prompt (nothing cut off), so the
        options can share one pass over the prompt."""
        return (bool(self.context) and all(self.options)
                and len(self.context) + max(map(len, self.options)) <= self.max_length)


def encode_questions(questions: Sequence[ChoiceQuestion], tokenizer, *, chat: bool,
                     shots: Sequence[ChoiceQuestion] = (), max_length: int = 1024) -> list[EncodedQuestion]:
    """Each question's prompt ids and its options' ids, as `choice_examples` encodes them.

    Plain prompts follow lm-evaluation-harness (`context_of`, `encode_options`: the prompt is
    tokenized alone, so its ids are the same for every option); with `chat` the solved shots are
    earlier turns, the question is the user's turn and the option is the assistant's reply,
    rendered by the chat template as in training."""
    bos = adds_bos(tokenizer)
    solved = [m for s in shots for m in ({"role": "user", "content": s.question},
                                         {"role": "assistant", "content": s.options[s.answer]})]
    out = []
    for q in questions:
        if chat:
            ctx = prompt_ids(tokenizer, [*solved, {"role": "user", "content": q.question}], chat=True)
            conts = [tokenizer(option, add_special_tokens=False)["input_ids"] for option in q.options]
        else:  # the whole text is tokenized per option, as the harness does
            ctx, conts = encode_options(tokenizer, context_of(q, shots),
                                        [TARGET_DELIMITER + o for o in q.options], bos)
        if not all(conts):
            raise QDyLoRAError(f"row {q.row}: an option is empty: every option needs text to score")
        out.append(EncodedQuestion(ctx, tuple(conts), max_length))
    return out


def choice_examples(questions: Sequence[ChoiceQuestion], tokenizer, *, chat: bool,
                    shots: Sequence[ChoiceQuestion] = (), max_length: int = 1024) -> list[Example]:
    """One example per (question, option), in order: the prompt (loss off) and the option (loss on)
    (`encode_questions`). Longer examples keep their last `max_length` tokens."""
    encoded = encode_questions(questions, tokenizer, chat=chat, shots=shots, max_length=max_length)
    return [e for q in encoded for e in q.examples()]


def choice_hits(loglik: torch.Tensor, questions: Sequence[ChoiceQuestion]) -> dict[str, torch.Tensor]:
    """{"acc", "acc_norm"}: (n_questions,) float64, 1.0 where the question was answered right, from
    the options' summed log-likelihoods (one per option, in `choice_examples` order). Ties go to
    the first option, as numpy's argmax does."""
    hits = {"acc": [], "acc_norm": []}
    at = 0
    for q in questions:
        ll = loglik[at:at + len(q.options)].double()  # (k,)
        at += len(q.options)
        chars = torch.tensor([float(len(o)) for o in q.options], dtype=torch.float64)  # (k,)
        hits["acc"].append(float(_first_argmax(ll) == q.answer))
        hits["acc_norm"].append(float(_first_argmax(ll / chars) == q.answer))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in hits.items()}


def choice_accuracy(loglik: torch.Tensor, questions: Sequence[ChoiceQuestion]) -> dict[str, float]:
    """{"acc", "acc_norm"} in percent (`choice_hits` averaged)."""
    return {k: 100.0 * float(v.sum()) / max(len(questions), 1) for k, v in choice_hits(loglik, questions).items()}


def _first_argmax(x: torch.Tensor) -> int:
    return int((x == x.max()).nonzero()[0])


def few_shot(rows: Sequence[dict], k: int,
             shots_rows: Optional[Sequence[dict]]) -> tuple[list[ChoiceQuestion], list[dict], int]:
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


# Attention implementations that take a custom 4D mask as given (transformers returns a 4D mask
# as-is); ALiBi models build their position bias from a 2D mask, so they are scored whole.
PACKING_ATTENTION = ("sdpa", "eager")
ALIBI_TYPES = ("bloom", "mpt")
# Packed rows of different lengths are padded to the longest; padding costs as much as tokens
# (measured: 16 MMLU questions, 8 ranks, SmolLM2-135M, bf16, 2-core AVX512 CPU: two questions a
# batch, padded, 18.3 s; one a batch 13.5 s), so a batch takes on a question only while padding
# stays under this share of its tokens.
MAX_PADDING = 0.1


def packs_options(model: nn.Module) -> bool:
    """True if `model` can score a question's options packed after one copy of its prompt: its
    forward takes position ids and its attention honours a custom 4D mask."""
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    return (config is not None and "position_ids" in params
            and getattr(config, "_attn_implementation", None) in PACKING_ATTENTION
            and not getattr(config, "alibi", False) and config.model_type not in ALIBI_TYPES)


@torch.no_grad()
def choice_logliks_shared(model: nn.Module, questions: Sequence[EncodedQuestion],
                          ranks: Sequence[Union[int, Allocation]], *, pad_id: int, batch_size: int = 8,
                          rank_batch: int = 0, autocast=contextlib.nullcontext,
                          on_batch=None) -> dict[Union[int, Allocation], torch.Tensor]:
    """`choice_logliks` of the questions' examples ({rank: (N options,) float64}, question by
    question, option by option), each question's prompt run once instead of once per option.

    A question becomes one packed row: its prompt, then all its options one after another. A 4D
    attention mask lets each option see the prompt and its own earlier tokens only, and position
    ids restart after the prompt for every option, so each option's log-probabilities are those
    of prompt + option alone (tree attention). No KV cache is copied: an earlier version that
    ran the options over a copied prompt cache was measured slower than whole options (138 s
    against 114 s, 40 MMLU questions, SmolLM2-135M, 8 ranks, bf16, 2-core AVX512 CPU).

    A batch holds whole questions of at most `batch_size` options together (one question at
    least), so it holds no more tokens than `choice_logliks`' batch of `batch_size` examples;
    its rows run at up to `rank_batch` ranks at a time (0 = all; rank-batched as
    `batch_losses_at_ranks`). Questions cut to max_length (`shareable` is False), and every
    question of a model that cannot pack (`packs_options`), are scored as `choice_logliks` scores
    them. `on_batch(k)` follows each batch at k ranks, per group of ranks: first
    ceil(options of the others / batch_size) whole-option batches, then the packed batches.
    """
    starts = [0]  # question i's options are starts[i]..starts[i+1]-1
    for q in questions:
        starts.append(starts[-1] + len(q.options))
    out = {r: torch.empty(starts[-1], dtype=torch.float64) for r in ranks}
    packed, rest = _split(model, questions)
    if rest:
        where = torch.tensor([o for i in rest for o in range(starts[i], starts[i + 1])])
        whole = choice_logliks(model, [e for i in rest for e in questions[i].examples()], ranks, pad_id=pad_id,
                               batch_size=batch_size, rank_batch=rank_batch, autocast=autocast, on_batch=on_batch)
        for r in ranks:
            out[r][where] = whole[r]
    device = next(model.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    group = rank_batch if rank_batch > 0 else len(ranks)
    for batch in _option_batches(packed, questions, batch_size):
        where = torch.tensor([o for i in batch for o in range(starts[i], starts[i + 1])])
        rows = _pack(model, [questions[i] for i in batch], pad_id, device)
        for start in range(0, len(ranks), group):
            chunk = list(ranks[start:start + group])
            with autocast():
                ll = _packed_logliks(model, rows, chunk, keeps_logits)  # (k, options)
            for j, r in enumerate(chunk):
                out[r][where] = ll[j].cpu()
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def shared_batch_count(model: nn.Module, questions: Sequence[EncodedQuestion], batch_size: int) -> int:
    """How many batches `choice_logliks_shared` runs per group of ranks (for a progress bar)."""
    packed, rest = _split(model, questions)
    whole = sum(len(questions[i].options) for i in rest)
    return len(_option_batches(packed, questions, batch_size)) + -(-whole // batch_size)


def _split(model: nn.Module, questions: Sequence[EncodedQuestion]) -> tuple[list[int], list[int]]:
    """(questions to pack, longest first; the others, scored whole, in order)."""
    packing = packs_options(model)
    packed = sorted((i for i, q in enumerate(questions) if packing and q.shareable),
                    key=lambda i: -questions[i].packed_length)  # similar lengths together
    return packed, sorted(set(range(len(questions))) - set(packed))


def _option_batches(order: list[int], questions: Sequence[EncodedQuestion], size: int) -> list[list[int]]:
    """`order` (longest packed row first) cut into runs of whole questions of at most `size`
    options (one question at least), a question joining only while padding stays under
    `MAX_PADDING` of the batch's tokens."""
    batches: list[list[int]] = []
    count, longest, tokens = size, 0, 0
    for i in order:
        q = questions[i]
        n = len(batches[-1]) + 1 if batches else 1
        if count + len(q.options) > size or n * longest - (tokens + q.packed_length) > MAX_PADDING * n * longest:
            batches.append([])
            count, longest, tokens = 0, q.packed_length, 0
        batches[-1].append(i)
        count, tokens = count + len(q.options), tokens + q.packed_length
    return batches


@dataclass
class _Packed:
    """One batch of packed questions (n rows of P tokens, left-padded) and where its options' S
    scored tokens are: option o's tokens are predicted at positions `at` of row `row`."""

    input_ids: torch.Tensor  # (n, P)
    mask: torch.Tensor  # (n, 1, P, P): query t may attend to key s
    position_ids: torch.Tensor  # (n, P)
    row: torch.Tensor  # (S,)
    at: torch.Tensor  # (S,): the position whose logits predict the token
    target: torch.Tensor  # (S,)
    option: torch.Tensor  # (S,): which of the batch's m options the token belongs to
    options: int  # m
    keep: int  # the last `keep` positions hold every `at`


def _pack(model: nn.Module, questions: Sequence[EncodedQuestion], pad_id: int, device: torch.device) -> _Packed:
    """Each question as prompt + option 1 + ... + option k in one row, with the mask and
    positions that make every option see only the prompt and itself."""
    n, P = len(questions), max(q.packed_length for q in questions)
    ids = torch.full((n, P), pad_id, dtype=torch.long)
    pos = torch.zeros((n, P), dtype=torch.long)
    allowed = torch.eye(P, dtype=torch.bool).repeat(n, 1, 1)  # (n, P, P): padding sees itself only
    row, at, target, option = [], [], [], []
    m = 0
    for i, q in enumerate(questions):
        c, off = len(q.context), P - q.packed_length
        ids[i, off:off + c] = torch.tensor(q.context)
        pos[i, off:off + c] = torch.arange(c)
        allowed[i, off:off + c, off:off + c] = torch.ones(c, c, dtype=torch.bool).tril()
        t = off + c  # the option's first token
        for o in q.options:
            n_o = len(o)
            ids[i, t:t + n_o] = torch.tensor(o)
            pos[i, t:t + n_o] = torch.arange(c, c + n_o)
            allowed[i, t:t + n_o, off:off + c] = True
            allowed[i, t:t + n_o, t:t + n_o] = torch.ones(n_o, n_o, dtype=torch.bool).tril()
            at += [off + c - 1, *range(t, t + n_o - 1)]  # the prompt's last token predicts the first
            row += [i] * n_o
            target += o
            option += [m] * n_o
            t, m = t + n_o, m + 1
    if model.config._attn_implementation == "sdpa":
        mask = allowed[:, None]  # True = attend
    else:  # eager adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    at_t = torch.tensor(at)
    return _Packed(ids.to(device), mask.to(device), pos.to(device), torch.tensor(row, device=device),
                   at_t.to(device), torch.tensor(target, device=device), torch.tensor(option, device=device),
                   m, P - int(at_t.min()))


def _packed_logliks(model: nn.Module, b: _Packed, ranks: list, keeps_logits: bool) -> torch.Tensor:
    """(k ranks, m options) float64 summed log-likelihoods of the packed batch's options."""
    k, n, P = len(ranks), b.input_ids.shape[0], b.input_ids.shape[1]
    ids, mask, pos = replicate_for_ranks(model, ranks, b.input_ids, b.mask, b.position_ids)  # (k*n, ...)
    # positions as a tensor, not a count: indexing gives the head a contiguous (k*n, keep, H) input,
    # where a slice would make matmul copy the head's weight once per row (measured: 36 % of the time)
    keep = {"logits_to_keep": torch.arange(P - b.keep, P, device=ids.device)} if keeps_logits else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **keep).logits  # (k*n, keep|P, V)
    first = P - logits.shape[1]  # the position of logits[:, 0]
    copies = torch.arange(k, device=ids.device)[:, None] * n  # (k, 1): row offset of each rank's copy
    picked = logits[(copies + b.row).flatten(), (b.at - first).repeat(k)]  # (k*S, V): scored positions only
    logp = torch.log_softmax(picked.float(), dim=-1).gather(-1, b.target.repeat(k)[:, None]).squeeze(1)  # (k*S,)
    sums = torch.zeros(k, b.options, dtype=torch.float64, device=ids.device)
    sums.scatter_add_(1, b.option.expand(k, -1), logp.double().view(k, -1))  # (k, m)
    return sums
