"""SweepSettings: one door for a sweep's settings, from flags or from Python."""

import pytest

from qdylora.errors import QDyLoRAError
from qdylora.evaluation.metrics import METRICS, TABLE, VALUES
from qdylora.evaluation.settings import SweepSettings


@pytest.mark.parametrize("values, message", [
    (dict(confidence=1.5), "--confidence must be below 1, got 1.5"),
    (dict(confidence=float("nan")), "--confidence must be a finite number"),
    (dict(loss_tolerance=-1.0), "--loss-tolerance must be at least 0"),
    (dict(accuracy_tolerance=float("inf")), "--accuracy-tolerance must be a finite number"),
    (dict(exhaustive=True, quick=True), "--exhaustive and --quick ask for opposite things"),
    (dict(metrics="loss,meteor"), "unknown metric 'meteor': use loss, exact_match, choice, rouge, bleu"),
    (dict(metrics=""), "no metric to measure"),
    (dict(ranks="0"), "--ranks 0 measures the base model only"),
    (dict(ranks="1-"), "cannot read ranks '1-'"),
    (dict(lm_eval_limit=0), "--lm-eval-limit must be at least 1"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
])
def test_a_bad_setting_is_one_line_naming_its_flag(values, message):
    with pytest.raises(QDyLoRAError, match=message.replace("(", r"\(")):
        SweepSettings(**values)


def test_settings_parse_their_lists():
    s = SweepSettings(ranks="1-4,8", metrics=" loss, exact_match ", lm_eval="mmlu,gsm8k")
    assert s.rank_list == [1, 2, 3, 4, 8] and s.metric_names == ["loss", "exact_match"]
    assert s.tasks == ["mmlu", "gsm8k"] and SweepSettings(metrics="", lm_eval="mmlu").metric_names == []
    assert SweepSettings().rank_list is None  # the run's powers of two
    assert s.tolerance(higher_is_better=False) == s.loss_tolerance and s.tolerance(True) == s.accuracy_tolerance


def test_every_metric_is_one_row_of_the_table():
    assert list(METRICS) == ["loss", "exact_match", "choice", "rouge", "bleu"]
    assert len(VALUES) == sum(len(m.values) for m in TABLE)  # no value named twice
    for metric in TABLE:
        assert (metric.score is not None) == (metric.family == "generation")  # how its rows are scored
    assert [v.name for v in VALUES.values() if not v.higher_is_better] == ["loss", "perplexity"]
    assert [v.name for v in VALUES.values() if not v.recommended] == ["perplexity"]
