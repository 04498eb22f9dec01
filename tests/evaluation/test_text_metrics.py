"""Generated-text scores against the libraries called directly: rouge-score, sacrebleu."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from qdylora.evaluation.text_metrics import bleu, exact_match, rouge

PREDICTIONS = ["the cat sat on the mat", "a dog barked loudly at night", "7 apples"]
REFERENCES = [["a cat was sitting on the mat"], ["the dog barked at night", "dogs bark loudly"], ["7"]]


def test_rouge_is_the_best_reference_of_rouge_score_averaged():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    got = rouge(PREDICTIONS, REFERENCES)
    for kind in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[kind].fmeasure for r in refs) for p, refs in zip(PREDICTIONS, REFERENCES)]
        assert got[kind] == pytest.approx(100 * sum(best) / len(best), abs=1e-9)
    assert 0 < got["rouge2"] < got["rouge1"] < 100


def test_bleu_is_sacrebleus_corpus_bleu_with_uneven_reference_counts():
    # sacrebleu wants equal reference streams: the one-reference rows repeat theirs
    streams = [[REFERENCES[0][0], REFERENCES[1][0], "7"], [REFERENCES[0][0], REFERENCES[1][1], "7"]]
    assert bleu(PREDICTIONS, REFERENCES) == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams).score)
    single = [[refs[0]] for refs in REFERENCES]
    assert bleu(PREDICTIONS, single) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [[r[0] for r in single]]).score)
    assert bleu(PREDICTIONS, single) != bleu(PREDICTIONS, REFERENCES)  # the second reference counts


def test_exact_match_accepts_any_of_several_references():
    assert exact_match(["Paris", "4"], [["London", "paris"], ["5"]]) == 50.0
    assert exact_match(["Paris"], [["London"]]) == 0.0
