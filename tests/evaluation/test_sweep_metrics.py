"""Every metric of the sweep at every rank: choice, ROUGE / BLEU, several references, the
lm-evaluation-harness bridge (its accuracy equals our `choice` on the same rows and prompt), and
bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from qdylora.cli import main
from qdylora.core.rank import evaluating
from qdylora.evaluation.choice import choice_accuracy, choice_examples, choice_logliks, choice_questions
from qdylora.evaluation.harness import write_choice_task
from qdylora.evaluation.settings import SweepSettings
from qdylora.evaluation.sweep import run_sweep
from qdylora.training.rundir import load_run

from ..conftest import adapted_model

CHOICE_ROWS = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)],
                "gold": (a + b) % 3} for a in range(1, 6) for b in range(1, 4)]
@pytest.fixture(scope="module")
def trained(trained_run):
    return load_run(trained_run)


@pytest.fixture(scope="module")
def choice_task(tmp_path_factory):
    """The multiple-choice sums as a JSONL and an lm-eval task directory over it (offline)."""
    root = tmp_path_factory.mktemp("choice")
    tasks = write_choice_task(CHOICE_ROWS, root, "sums_choice")
    return root / "sums_choice.jsonl", tasks


def test_every_metric_at_every_rank_in_one_sweep(trained):
    model, tok, s = trained
    rows = [{"question": f"{a}+{b}=", "answer": [str(a + b), f"{a + b}."], "choices": [str(a + b), "0"],
             "gold": 0} for a in range(1, 4) for b in range(1, 4)]
    result = run_sweep(model, tok, rows, s.data, [1, 4, 8],
                       SweepSettings(metrics="loss,exact_match,choice,rouge,bleu", max_new_tokens=3), progress=False)
    expected = {"loss", "perplexity", "exact_match", "acc", "acc_norm", "rouge1", "rouge2", "rougeL", "bleu"}
    assert set(result.values) == expected
    assert all(set(v) == {0, 1, 4, 8} for v in result.values.values())
    assert set(result.recommended) == expected - {"perplexity"}
    # choice at every rank equals the same questions scored one rank at a time
    qs = choice_questions(rows)
    for r in (0, 8):
        with evaluating(model):  # as the sweep runs: dropout off
            one = choice_logliks(model, choice_examples(qs, tok, chat=False), [r], pad_id=tok.pad_token_id,
                                 rank_batch=1)[r]
        assert choice_accuracy(one, qs) == {"acc": result.values["acc"][r], "acc_norm": result.values["acc_norm"][r]}
    assert result.csv().splitlines()[0] == "rank,params," + ",".join(
        f"{m}{part}" for m in result.values for part in ("", "_low", "_high", "_rows"))
    for m, by in result.values.items():  # every value inside its interval (exact match may be 0 everywhere)
        assert all(result.intervals[m][r][0] - 1e-9 <= v <= result.intervals[m][r][1] + 1e-9 for r, v in by.items())


@pytest.mark.parametrize("exhaustive", [True, False])
def test_progress_bars_end_full(trained, capsys, exhaustive):
    """Each metric family's bar counts the batches it runs: it ends at its total, adaptive or not."""
    model, tok, s = trained
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b), "choices": [str(a + b), "0", f"{a}{b}"], "gold": 0}
            for a in range(1, 9) for b in range(1, 9)]  # 64 rows: two adaptive rounds at least
    run_sweep(model, tok, rows, s.data, [1, 2, 4, 8],
              SweepSettings(metrics="loss,exact_match,choice", max_new_tokens=2, batch_size=4, exhaustive=exhaustive))
    ends = {}
    for line in capsys.readouterr().err.replace("\r", "\n").splitlines():
        m = re.match(r"(\w+): .*?(\d+)/(\d+) ", line)
        if m:
            ends[m[1]] = (int(m[2]), int(m[3]))
    assert set(ends) == {"loss", "generation", "choice"}
    assert all(done == total > 0 for done, total in ends.values()), ends


def test_the_harness_scores_every_rank_as_our_choice_metric_does(tiny_lm, choice_task):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from qdylora.evaluation.harness import harness_at_ranks

    data, tasks = choice_task
    model, tok = adapted_model(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    ranks = [0, 2, 8]
    scores, higher = harness_at_ranks(model, tok, ["sums_choice"], ranks, include=tasks, batch_size=4)
    qs = choice_questions(CHOICE_ROWS)
    ours = choice_logliks(model, choice_examples(qs, tok, chat=False), ranks, pad_id=tok.pad_token_id)
    for r in ranks:
        mine = choice_accuracy(ours[r], qs)
        assert scores[r]["sums_choice"] == {"acc": pytest.approx(mine["acc"] / 100),
                                            "acc_norm": pytest.approx(mine["acc_norm"] / 100)}
    assert higher["sums_choice"] == {"acc": True, "acc_norm": True}
    assert len({round(float(ours[r].sum()), 3) for r in ranks}) == len(ranks)  # the ranks differ


def test_cli_sweep_with_choice_and_lm_eval(trained_run, choice_task, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    data, tasks = choice_task
    out = tmp_path / "sweep"
    argv = ["sweep", str(trained_run), "--data", str(data), "--metrics", "choice", "--ranks", "1,8",
            "--lm-eval", "sums_choice", "--lm-eval-include", str(tasks), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sums_choice:acc" in printed and "recommended rank by acc:" in printed
    saved = json.loads((out / "sweep.json").read_text())
    for r in ("0", "1", "8"):  # the harness and our metric agree at every rank (percent both)
        assert saved["values"]["lm_eval:sums_choice:acc"][r] == pytest.approx(saved["values"]["acc"][r])
        assert saved["values"]["lm_eval:sums_choice:acc_norm"][r] == pytest.approx(saved["values"]["acc_norm"][r])
    header = (out / "sweep.csv").read_text().splitlines()[0]
    names = ["acc", "acc_norm", "lm_eval:sums_choice:acc", "lm_eval:sums_choice:acc_norm"]
    assert header == ",".join(["rank", "params", *(f"{m}{p}" for m in names for p in ("", "_low", "_high", "_rows"))])
    low, high = saved["intervals"]["lm_eval:sums_choice:acc"]["8"]  # the harness's standard error, as an interval
    assert low < saved["values"]["lm_eval:sums_choice:acc"]["8"] < high


def bad_file(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("extra, rows, message", [
    (["--metrics", "choice"], [{"question": "q", "options": ["a"], "answer": 0}],
     "row 0 has 1 option: a multiple-choice question needs at least two"),
    (["--metrics", "choice"], [{"question": "q", "options": ["a", "b"], "answer": "c"}],
     "row 0: the answer 'c' matches none of its 2 options"),
    (["--metrics", "rouge"], [{"question": "q"}], "row 0 has no answer"),
    (["--metrics", "rouge"], [{"question": "q", "answer": []}], "row 0: its reference list answer is empty"),
    (["--metrics", "meteor"], [{"question": "q", "answer": "a"}], "unknown metric 'meteor'"),
    (["--metrics", "choice", "--shots", "-1"], [{"question": "q", "options": ["a", "b"], "answer": 0}],
     "--shots must be at least 0, got -1"),
])
def test_cli_sweep_bad_metric_input(trained_run, tmp_path, capsys, extra, rows, message):
    out = tmp_path / "out"
    code = main(["sweep", str(trained_run), "--data", bad_file(tmp_path, rows), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qdylora: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_cli_sweep_unknown_lm_eval_task(trained_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    code = main(["sweep", str(trained_run), "--metrics", "loss", "--lm-eval", "no_such_task",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown lm-eval task 'no_such_task'" in err and "--lm-eval-include" in err
    assert not out.exists()


def test_cli_sweep_without_the_harness_says_how_to_install_it(trained_run, tmp_path):
    """A real process where `import lm_eval` fails, as without the extra installed."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['lm_eval'] = None; from qdylora.cli import main; "
            f"sys.exit(main(['sweep', {str(trained_run)!r}, '--lm-eval', 'mmlu', '--out', {str(out)!r}, '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "qdylora: error: --lm-eval needs lm-evaluation-harness, which is not installed: "
        "pip install 'qdylora[lm-eval]' (or pip install lm-eval)")
    assert not out.exists()
