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


@torch.no_grad()
def choice_logliks_shared(model: nn.Module, questions: Sequence[EncodedQuestion],
                          ranks: Sequence[Union[int, Allocation]], *, pad_id: int, batch_size: int = 8,
                          rank_batch: int = 0, autocast=contextlib.nullcontext,
                          on_batch=None) -> dict[Union[int, Allocation], torch.Tensor]:
    """`choice_logliks` of the questions' examples ({rank: (N options,) float64}, question by
    question, option by option), each question's prompt run once per rank instead of once per option.

    A batch is `batch_size` questions: their prompts (left-padded) run at up to `rank_batch` ranks
    at a time (0 = all; rank-batched as `batch_losses_at_ranks`), which gives each option's first
    token; the prompts' KV cache is then copied to every (rank, option) row and all options' tokens
    run in one more pass (k ranks * the batch's options rows, each over its prompt's cache).
    Questions whose examples are cut to max_length (`shareable` is False), and every question of a
    model whose forward takes no KV cache, are scored as `choice_logliks` scores them.
    `on_batch(k)` follows each batch at k ranks: ceil(shareable questions / batch_size), then
    ceil(options of the others / batch_size) batches per group of ranks.
    """
    params = inspect.signature(model.forward).parameters
    cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)  # named cache since 5.x
    caches = cache_arg is not None and "use_cache" in params
    starts = [0]  # question i's options are starts[i]..starts[i+1]-1
    for q in questions:
        starts.append(starts[-1] + len(q.options))
    out = {r: torch.empty(starts[-1], dtype=torch.float64) for r in ranks}
    rest = [i for i, q in enumerate(questions) if not (caches and q.shareable)]
    if rest:
        where = torch.tensor([o for i in rest for o in range(starts[i], starts[i + 1])])
        old = choice_logliks(model, [e for i in rest for e in questions[i].examples()], ranks, pad_id=pad_id,
                             batch_size=batch_size, rank_batch=rank_batch, autocast=autocast, on_batch=on_batch)
        for r in ranks:
            out[r][where] = old[r]
    device = next(model.parameters()).device
    shared = sorted(set(range(len(questions))) - set(rest), key=lambda i: -len(questions[i].context))
    group = rank_batch if rank_batch > 0 else len(ranks)
    for s in range(0, len(shared), batch_size):  # similar prompt lengths together
        batch = shared[s:s + batch_size]
        where = torch.tensor([o for i in batch for o in range(starts[i], starts[i + 1])])
        for start in range(0, len(ranks), group):
            chunk = list(ranks[start:start + group])
            with autocast():
                ll = _shared_batch(model, [questions[i] for i in batch], chunk, pad_id, device, cache_arg,
                                   "logits_to_keep" in params)  # (k, options)
            for j, r in enumerate(chunk):
                out[r][where] = ll[j].cpu()
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def _shared_batch(model: nn.Module, questions: Sequence[EncodedQuestion], ranks: list, pad_id: int,
                  device: torch.device, cache_arg: str, keeps_logits: bool) -> torch.Tensor:
    """(k ranks, m options) float64 summed log-likelihoods of the options of `questions`."""
    n, k = len(questions), len(ranks)
    lengths = torch.tensor([len(q.context) for q in questions], device=device)  # (n,)
    T = int(lengths.max())
    ctx = torch.full((n, T), pad_id, dtype=torch.long)
    for i, q in enumerate(questions):  # left-padded: every prompt's next token comes at T-1
        ctx[i, T - len(q.context):] = torch.tensor(q.context)
    ctx_mask = (torch.arange(T, device=device) >= T - lengths[:, None]).long()  # (n, T)
    ctx_pos = (ctx_mask.cumsum(1) - 1).clamp(min=0)  # (n, T): 0.. from each prompt's first token
    options = [o for q in questions for o in q.options]
    owner = torch.tensor([i for i, q in enumerate(questions) for _ in q.options], device=device)  # (m,)
    L = max(map(len, options))
    opt = torch.full((len(options), L), pad_id, dtype=torch.long)
    for i, o in enumerate(options):  # right-padded
        opt[i, :len(o)] = torch.tensor(o)
    opt_len = torch.tensor([len(o) for o in options], device=device)  # (m,)
    opt_mask = (torch.arange(L, device=device) < opt_len[:, None]).long()  # (m, L)
    opt_pos = lengths[owner][:, None] + torch.arange(L, device=device)  # (m, L): after each prompt's tokens

    ids, mask, pos = replicate_for_ranks(model, ranks, ctx.to(device), ctx_mask, ctx_pos)  # (k*n, T)
    keep = {"logits_to_keep": 1} if keeps_logits else {}
    result = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    first = torch.log_softmax(result.logits[:, -1].float(), dim=-1)  # (k*n, V): after each prompt
    rows = (torch.arange(k, device=device)[:, None] * n + owner).flatten()  # (k*m,): prompt row of each
    ll = first[rows, opt[:, 0].to(device).repeat(k)].double()  # (k*m,): each option's first token
    if L > 1:  # the other tokens, each option over its own prompt's cache
        cache = getattr(result, cache_arg)
        cache.reorder_cache(rows)  # every layer's keys and values (k*n, ...) -> (k*m, ...), on its device
        ids, opt_mask, pos = replicate_for_ranks(model, ranks, opt.to(device), opt_mask, opt_pos)  # (k*m, L)
        keep = {"logits_to_keep": torch.arange(L - 1, device=device)} if keeps_logits else {}
        logits = model(input_ids=ids, attention_mask=torch.cat([mask[rows], opt_mask], dim=1), position_ids=pos,
                       use_cache=True, **{cache_arg: cache}, **keep).logits[:, :L - 1]  # (k*m, L-1, V)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (k*m, L-1)
        ll += torch.where(opt_mask[:, 1:].bool(), logp, 0.0).double().sum(dim=1)
    return ll.view(k, -1)
