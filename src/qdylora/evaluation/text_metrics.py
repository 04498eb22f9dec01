"""Scores of generated text against one or several references: exact match, ROUGE and BLEU.

ROUGE is Google's `rouge-score` (the package lm-evaluation-harness and the papers use): rouge-1,
rouge-2 and rouge-L F1 with the Porter stemmer, the best over a row's references, averaged over
rows. BLEU is `sacrebleu`'s corpus BLEU with its default 13a tokenizer. All in percent.
"""

from __future__ import annotations

from typing import Sequence

from .answers import is_correct

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percent of predictions that match any of their references (`answers.is_correct`)."""
    hits = sum(any(is_correct(p, r) for r in refs) for p, refs in zip(predictions, references))
    return 100.0 * hits / max(len(predictions), 1)


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"}: mean over rows of the best F1 against the row's references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = [scorer.score(ref, prediction) for ref in refs]  # score(target, prediction)
        for kind in ROUGE_TYPES:
            totals[kind] += max(s[kind].fmeasure for s in scores)
    return {k: 100.0 * v / max(len(predictions), 1) for k, v in totals.items()}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU. Rows with fewer references than the most any row has repeat
    their last one (sacrebleu wants reference streams of equal length; a repeated reference
    changes neither the n-gram counts that can match nor the closest length)."""
    import sacrebleu

    most = max((len(refs) for refs in references), default=1)
    streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(most)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)
