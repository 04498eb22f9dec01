"""Multiple-choice scoring: row parsing, lm-evaluation-harness's encoding, and log-likelihoods
at every rank against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig, QDyLoRAError
from qdylora.core.allocation import Allocation
from qdylora.evaluation.choice import (ChoiceQuestion, choice_accuracy, choice_examples, choice_logliks,
                                       choice_logliks_shared, choice_questions, context_of, encode_pair,
                                       encode_questions, few_shot, packs_options,
                                       shared_batch_count)
from qdylora.evaluation.choice import MAX_PADDING, EncodedQuestion, _option_batches
from qdylora.data.rows import IGNORE

from ..conftest import char_tokenizer, tiny_model

ROWS = [
    {"question": "2+2=?", "options": ["3", "4", "22"], "answer": 1},
    {"question": "Sky?", "options": "A. blue\nB. green", "answer": "A. blue"},
    {"query": "Cat says", "choices": {"text": ["woof", "meow"], "label": ["A", "B"]}, "answerKey": "B"},
    {"question": "Big?", "options": ["small", "huge", "tiny", "wee"], "answer": "huge"},
    {"question": "3 < 5?", "options": ["yes", "no"], "label": "0"},
]


def test_rows_in_every_common_shape_parse():
    qs = choice_questions(ROWS)
    assert [q.answer for q in qs] == [1, 0, 1, 1, 0]
    assert qs[1].options == ("blue", "green") and qs[2].question == "Cat says"


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "options": ["only"], "answer": 0},
     "row 0 has 1 option: a multiple-choice question needs at least two"),
    ({"question": "q", "options": ["a", "b"], "answer": "c"}, "row 0: the answer 'c' matches none of its 2 options"),
    ({"question": "q", "options": ["a", "b"], "answer": 2}, "matches none of its 2 options"),
    ({"question": "q", "options": "A. a\nno letter", "answer": "A"}, "is not of the form 'A. text'"),
    ({"options": ["a", "b"], "answer": 0}, "row 0 has no question"),
    ({"question": "q", "answer": 0}, "row 0 has no options"),
    ({"question": "q", "options": ["a", "b"]}, "row 0 has no answer"),
])
def test_bad_rows_are_one_line_naming_the_row(row, message):
    with pytest.raises(QDyLoRAError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choice_questions([row])


def test_encoding_follows_lm_evaluation_harness():
    tok = char_tokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes", bos=True)  # the trailing space moves to the option
    assert tok.decode(ctx) == "<s>Answer:" and tok.decode(cont) == " yes"
    [q] = choice_questions(ROWS[:1])
    examples = choice_examples([q], tok, chat=False)
    assert len(examples) == 3
    for e, option in zip(examples, q.options):
        scored = [t for t, label in zip(e.input_ids, e.labels) if label != IGNORE]
        assert tok.decode(scored) == " " + option
        assert tok.decode(e.input_ids).startswith("Question: 2+2=?\nAnswer:")  # this tokenizer adds no BOS


def test_shots_come_from_the_first_rows_or_their_own_file():
    shots, rows, first = few_shot(ROWS, 2, None)
    assert [s.question for s in shots] == ["2+2=?", "Sky?"] and rows == ROWS[2:] and first == 2
    shots, rows, first = few_shot(ROWS, 1, ROWS[3:])
    assert shots[0].question == "Big?" and rows == ROWS and first == 0
    tok = char_tokenizer()
    [e] = choice_examples(choice_questions(ROWS[:1])[:1], tok, chat=False, shots=shots)[:1]
    assert tok.decode(e.input_ids).startswith("Question: Big?\nAnswer: huge\n\nQuestion: 2+2=?\nAnswer:")
    with pytest.raises(QDyLoRAError, match="leave none of its 5 rows"):
        few_shot(ROWS, 5, None)


def adapted_model(dtype: str, arch: str = "llama"):
    model = qdylora.prepare(tiny_model(arch), QDyLoRAConfig(max_rank=8, compute_dtype=dtype, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model.eval()


def reference_logliks(model, examples, rank: int) -> np.ndarray:
    """Each example alone, unpadded, at one rank; log-softmax and the sum in float64."""
    out = []
    with torch.no_grad(), qdylora.at_rank(model, rank):
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t+1
            targets = torch.tensor(e.input_ids[1:])
            scored = torch.tensor(e.labels[1:]) != IGNORE
            out.append(float(logp[torch.arange(len(targets)), targets][scored].sum()))
    return np.array(out)


# sums of ~25 token log-probabilities: bf16's per-token error (batched and padded vs alone) adds up
@pytest.mark.parametrize("dtype, tol", [("float32", dict(rtol=2e-5, atol=2e-4)),
                                        ("bfloat16", dict(rtol=0.05, atol=0.3))])
def test_logliks_at_every_rank_equal_a_float64_reference(dtype, tol):
    model, tok = adapted_model(dtype), char_tokenizer()
    qs = choice_questions(ROWS)
    examples = choice_examples(qs, tok, chat=False)
    ranks = [0, 1, 4, 8]
    got = choice_logliks(model, examples, ranks, pad_id=tok.pad_token_id, batch_size=3)
    one_by_one = choice_logliks(model, examples, ranks, pad_id=tok.pad_token_id, batch_size=3, rank_batch=1)
    for r in ranks:
        ref = reference_logliks(model, examples, r)
        np.testing.assert_allclose(got[r].numpy(), ref, **tol)
        np.testing.assert_allclose(got[r].numpy(), one_by_one[r].numpy(), **tol)
        # accuracy as lm-evaluation-harness computes it (numpy argmax per question)
        acc, norm, at = 0, 0, 0
        for q in qs:
            ll = ref[at:at + len(q.options)]
            at += len(q.options)
            acc += int(np.argmax(ll) == q.answer)
            norm += int(np.argmax(ll / np.array([len(o) for o in q.options])) == q.answer)
        if dtype == "float32":
            assert choice_accuracy(got[r], qs) == {"acc": 100 * acc / len(qs), "acc_norm": 100 * norm / len(qs)}
    assert not torch.allclose(got[0], got[8])  # the adapter changes the scores: not a no-op


def test_accuracy_counts_the_first_of_tied_options():
    qs = [ChoiceQuestion("q", ("ab", "a"), 0, 0), ChoiceQuestion("q", ("x", "y"), 1, 1)]
    ll = torch.tensor([-2.0, -1.0, -3.0, -3.0])  # q0: option 1 wins acc, ties per char; q1: tie
    assert choice_accuracy(ll, qs) == {"acc": 0.0, "acc_norm": 50.0}


def test_encoded_questions_hold_the_prompt_once_and_give_the_same_examples():
    tok = char_tokenizer()
    qs, shots = choice_questions(ROWS), choice_questions(ROWS[3:4])
    for q, e in zip(qs, encode_questions(qs, tok, chat=False, shots=shots)):
        pairs = [encode_pair(tok, context_of(q, shots), " " + o, bos=False) for o in q.options]
        assert all(ctx == e.context for ctx, _ in pairs) and [c for _, c in pairs] == list(e.options)
    for chat in (False, True):
        encoded = encode_questions(qs, tok, chat=chat, shots=shots, max_length=30)
        assert [x for e in encoded for x in e.examples()] == choice_examples(qs, tok, chat=chat, shots=shots,
                                                                              max_length=30)


def shared_and_old(model, qs, tok, ranks, *, chat, shots=(), cut=False, rank_batch=0, expect_packed=True):
    """(shared path, old path) on the same questions, batches of 5 options (3 examples for the old
    path); `cut` sets
    max_length one short of the longest question, so that question is cut (and falls back)."""
    encoded = encode_questions(qs, tok, chat=chat, shots=shots)
    if cut:
        longest = max(len(e.context) + max(map(len, e.options)) for e in encoded)
        encoded = encode_questions(qs, tok, chat=chat, shots=shots, max_length=longest - 1)
        assert 0 < sum(e.shareable for e in encoded) < len(encoded)
    calls = []
    got = choice_logliks_shared(model, encoded, ranks, pad_id=tok.pad_token_id, batch_size=5,
                                rank_batch=rank_batch, on_batch=calls.append)
    old = choice_logliks(model, [x for e in encoded for x in e.examples()], ranks, pad_id=tok.pad_token_id,
                         batch_size=3)
    groups = len(ranks) if rank_batch == 1 else 1
    batches = shared_batch_count(model, encoded, 5)  # what the sweep's progress bar expects
    assert calls == [len(ranks) // groups] * (batches * groups)
    return got, old


@pytest.mark.parametrize("dtype, chat, rank_batch", [
    ("float32", False, 0), ("float32", True, 0), ("float32", False, 1), ("float32", True, 1),
    ("bfloat16", False, 0),
])
def test_shared_prompt_logliks_equal_the_per_option_path(dtype, chat, rank_batch):
    """Questions of 2-4 options and prompts of different lengths (padding in every batch), a
    solved shot, one question cut to max_length, uniform ranks and an allocation."""
    model, tok = adapted_model(dtype), char_tokenizer()
    mixed = Allocation.of({p: i % 9 for i, p in enumerate(model.adapter_layers())}, "mixed")
    ranks = [0, 1, 4, 8, mixed]
    got, old = shared_and_old(model, choice_questions(ROWS), tok, ranks, chat=chat,
                              shots=choice_questions(ROWS[3:4]), cut=True, rank_batch=rank_batch)
    tol = dict(rtol=2e-5, atol=2e-4) if dtype == "float32" else dict(rtol=0.05, atol=0.3)
    assert set(got) == set(ranks)
    for r in ranks:
        assert got[r].dtype == torch.float64 and got[r].shape == (13,)
        np.testing.assert_allclose(got[r].numpy(), old[r].numpy(), **tol)
    assert not torch.allclose(got[0], got[8]) and not torch.allclose(got[8], got[mixed])  # no no-op adapter


# Learned absolute positions (gpt2, opt: right only with explicit position_ids), q/k/v biases
# (qwen2), and eager attention, which adds a float mask instead of taking a boolean one.
@pytest.mark.parametrize("arch, attention", [("gpt2", "sdpa"), ("opt", "sdpa"), ("mistral", "sdpa"),
                                             ("qwen2", "sdpa"), ("falcon", "sdpa"), ("llama", "eager")])
def test_shared_prompt_logliks_on_other_architectures(arch, attention):
    model, tok = adapted_model("float32", arch), char_tokenizer()
    model.set_attn_implementation(attention)
    assert packs_options(model)
    for chat in (False, True):
        got, old = shared_and_old(model, choice_questions(ROWS), tok, [0, 3, 8], chat=chat)
        for r in (0, 3, 8):
            np.testing.assert_allclose(got[r].numpy(), old[r].numpy(), rtol=2e-5, atol=2e-4)
        assert not torch.allclose(got[0], got[8])


def test_packed_batches_hold_whole_questions_with_little_padding():
    lengths = [40, 39, 38, 30, 29, 10, 10, 10, 10, 9]  # packed lengths, longest first
    qs = [EncodedQuestion([1] * (n - 4), ([2], [3], [4], [5]), 1024) for n in lengths]  # 4 options each
    batches = _option_batches(list(range(len(qs))), qs, 8)
    assert [i for b in batches for i in b] == list(range(len(qs)))  # every question once, in order
    assert batches == [[0, 1], [2], [3, 4], [5, 6], [7, 8], [9]]  # 2 questions (8 options) at most
    for b in batches:
        padded = len(b) * qs[b[0]].packed_length
        assert padded - sum(qs[i].packed_length for i in b) <= MAX_PADDING * padded
    assert _option_batches([0], qs, 2) == [[0]]  # a question of more options than the batch: alone


def test_models_that_cannot_pack_score_options_whole():
    """ALiBi builds its bias from a 2D mask: such a model gets the whole-option path."""
    model, tok = adapted_model("float32", "falcon"), char_tokenizer()
    model.config.alibi = True
    assert not packs_options(model)
    got, old = shared_and_old(model, choice_questions(ROWS), tok, [0, 8], chat=False, expect_packed=False)
    for r in (0, 8):
        np.testing.assert_allclose(got[r].numpy(), old[r].numpy(), rtol=2e-5, atol=2e-4)
