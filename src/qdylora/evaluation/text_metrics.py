"""Scores of generated text against one or several references: exact match, ROUGE and BLEU.

ROUGE is Google's `rouge-score` (the package lm-evaluation-harness and the papers use): rouge-1,
rouge-2 and rouge-L F1 with the Porter stemmer, the best over a row's references, averaged over
rows. BLEU is `sacrebleu`'s corpus BLEU with its default 13a tokenizer. All in percent.

Each metric also comes per row (`*_rows`, `bleu_stats`): the statistics whose sum over rows gives
the corpus value, which is what the sweep's intervals resample (`confidence`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .answers import is_correct

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def exact_match_rows(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """1.0 where a prediction matches any of its references (`answers.is_correct`), else 0.0."""
    return [float(any(is_correct(p, r) for r in refs)) for p, refs in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percent of predictions that match any of their references."""
    return 100.0 * sum(exact_match_rows(predictions, references)) / max(len(predictions), 1)


def rouge_rows(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """{"rouge1", "rouge2", "rougeL"}: each row's best F1 (0..1) against its references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references):
        scores = [scorer.score(ref, prediction) for ref in refs]  # score(target, prediction)
        for kind in ROUGE_TYPES:
            out[kind].append(max(s[kind].fmeasure for s in scores))
    return out


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL"}: mean over rows of the best F1 against the row's references."""
    return {k: 100.0 * sum(v) / max(len(predictions), 1) for k, v in rouge_rows(predictions, references).items()}


def _bleu():
    import sacrebleu

    return sacrebleu.BLEU()


def bleu_stats(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> torch.Tensor:
    """(n, 2 + 2 * 4) float64: sacrebleu's statistics of each row (hypothesis and closest
    reference lengths, matched and total n-grams of orders 1-4); their sum gives corpus BLEU
    (`bleu_from_stats`). Rows with fewer references than the most any row has repeat their last
    one (sacrebleu wants reference streams of equal length; a repeated reference changes neither
    the n-gram counts that can match nor the closest length)."""
    most = max((len(refs) for refs in references), default=1)
    streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(most)]
    rows = _bleu()._extract_corpus_statistics(list(predictions), streams) if predictions else []
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 10)


def bleu_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Corpus BLEU (0-100) from summed `bleu_stats`, (..., 10) -> (...)."""
    metric, flat = _bleu(), stats.reshape(-1, stats.shape[-1])
    scores = [metric._compute_score_from_stats([round(float(x)) for x in row]).score for row in flat]
    return torch.tensor(scores, dtype=torch.float64).reshape(stats.shape[:-1])


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU."""
    return float(bleu_from_stats(bleu_stats(predictions, references).sum(0)))
