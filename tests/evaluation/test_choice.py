"""Multiple-choice scoring: row parsing, lm-evaluation-harness's encoding, and log-likelihoods
at every rank against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig, QDyLoRAError
from qdylora.evaluation.choice import (ChoiceQuestion, choice_accuracy, choice_examples, choice_logliks,
                                       choice_questions, encode_pair, few_shot)
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
    ({"question": "q", "options": ["only"], "answer": 0}, "row 0 has 1 option: a multiple-choice question needs at least two"),
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


def adapted_model(dtype: str):
    model = qdylora.prepare(tiny_model("llama"), QDyLoRAConfig(max_rank=8, compute_dtype=dtype, dropout=0.0))
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
@pytest.mark.parametrize("dtype, tol", [("float32", dict(rtol=2e-5, atol=2e-4)), ("bfloat16", dict(rtol=0.05, atol=0.3))])
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
