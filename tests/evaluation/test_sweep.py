"""The rank sweep: rank-batched evaluation equals one rank at a time; outputs and errors."""

from __future__ import annotations

import json

import pytest
import torch

from qdylora.cli import main
from qdylora.core.rank import at_rank
from qdylora.data.batching import fixed_batches
from qdylora.data.rows import RowFormat, generation_prompts, tokenize
from qdylora.errors import QDyLoRAError
from qdylora.evaluation.generation import generate_at_ranks
from qdylora.evaluation.settings import SweepSettings
from qdylora.evaluation.sweep import default_ranks, run_sweep
from qdylora.training.losses import losses_at_ranks
from qdylora.training.rundir import load_run

RANKS = [0, 1, 2, 4, 8]
SUMS = RowFormat("template", "{question}", "{answer}")


@pytest.fixture(scope="module")
def trained(trained_run):
    model, tok, run_settings = load_run(trained_run)
    return trained_run, model, tok, run_settings


def test_default_ranks():
    assert default_ranks(64) == [0, 1, 2, 4, 8, 16, 32, 64]
    assert default_ranks(12) == [0, 1, 2, 4, 8, 12]


def test_values_with_standard_errors_only_get_the_same_rule():
    """lm-eval values (a standard error, no per-row scores): the point-estimate rule said "rank 2"
    whatever the errors. Now: with tiny errors the same pick, and sure; with the harness's real
    errors or none, not sure, and the line says so; the bounds are the normal approximation."""
    import statistics

    from qdylora.evaluation.confidence import decide_from_estimates

    acc = {0: 10.0, 1: 40.0, 2: 59.6, 4: 60.0, 8: 58.0}
    tiny = decide_from_estimates("acc", acc, {r: 1e-6 for r in acc}, True, 0.5)
    assert tiny.recommended == 2 and tiny.sure
    wide = decide_from_estimates("acc", acc, {r: 3.0 for r in acc}, True, 0.5, rows=100)
    assert wide.recommended == 4 and 2 in wide.undecided and not wide.sure and "would tell" in wide.message()
    z = statistics.NormalDist().inv_cdf(0.95)
    c = wide.comparisons[1]  # rank 1 against the best (rank 4): deficit 20 points
    assert c.deficit_bounds == pytest.approx((20 - z * 18**0.5, 20 + z * 18**0.5), abs=1e-9)
    unknown = decide_from_estimates("acc", acc, {}, True, 0.5)
    assert not unknown.sure and "more rows would tell" in unknown.message()
    loss = {0: 3.0, 1: 2.0, 2: 1.5, 4: 1.01, 8: 1.0}
    assert decide_from_estimates("loss", loss, {r: 1e-6 for r in loss}, False, 0.011).recommended == 4


def test_rank_batched_loss_equals_one_rank_at_a_time(trained):
    run, model, tok, s = trained
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:12]]
    examples, _ = tokenize(rows, tok, SUMS)
    batches = fixed_batches(examples, 4)
    model.eval()
    batched = losses_at_ranks(model, batches, RANKS, tok.pad_token_id, torch.device("cpu"))
    one_by_one = losses_at_ranks(model, batches, RANKS, tok.pad_token_id, torch.device("cpu"), rank_batch=1)
    two = losses_at_ranks(model, batches, RANKS, tok.pad_token_id, torch.device("cpu"), rank_batch=2)
    for r in RANKS:
        assert batched[r][1] == one_by_one[r][1] == two[r][1]
        assert batched[r][0] == pytest.approx(one_by_one[r][0], rel=1e-5)
        assert two[r][0] == pytest.approx(one_by_one[r][0], rel=1e-5)
    assert len({round(v[0], 3) for v in batched.values()}) == len(RANKS)  # the ranks differ


def test_rank_batched_generation_equals_one_rank_at_a_time(trained):
    run, model, tok, s = trained
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:6]]
    prompts, refs = generation_prompts(rows, tok, SUMS)
    model.eval()
    batched = generate_at_ranks(model, tok, prompts, RANKS, batch_size=4, max_new_tokens=4)
    sequential = generate_at_ranks(model, tok, prompts, RANKS, batch_size=4, max_new_tokens=4, rank_batch=1)
    assert batched == sequential
    with at_rank(model, 8):
        alone = generate_at_ranks(model, tok, prompts[:1], [8], batch_size=1, max_new_tokens=4)
    assert alone[8][0] == batched[8][0]  # padding and batching do not change the answer
    assert batched[0] != batched[8]  # the adapter changes the generations


def test_the_head_gets_contiguous_input_in_generation(trained):
    # transformers hands the head a strided view of the prompt's last position at the prefill;
    # torch's CPU bf16 linear is ~600x slower on it (generation.contiguous_head_input)
    run, model, tok, s = trained
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:4]]
    prompts, _ = generation_prompts(rows, tok, SUMS)
    seen = []
    head = model.model.get_output_embeddings()
    # a forward hook sees the input as the forward got it (after every pre-hook)
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        model.eval()
        generate_at_ranks(model, tok, prompts, [0, 8], batch_size=4, max_new_tokens=3)
    finally:
        spy.remove()
    assert len(seen) == 3 and all(seen)  # the prefill and two decoding steps
    assert not head._forward_pre_hooks  # ours is removed after generating


def test_run_sweep_reports_every_rank(trained):
    run, model, tok, s = trained
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:8]]
    result = run_sweep(model, tok, rows, s.data, [1, 4, 8], SweepSettings(max_new_tokens=3), progress=False)
    assert result.ranks == [0, 1, 4, 8]
    assert set(result.values) == {"loss", "perplexity", "exact_match"}
    assert result.values["loss"][8] < result.values["loss"][0]
    assert result.recommended["loss"] in (1, 4, 8)
    with at_rank(model, 0):  # rank 0 is the base model
        base = losses_at_ranks(model, fixed_batches(tokenize(rows, tok, SUMS)[0], 8), [0], tok.pad_token_id,
                               torch.device("cpu"))
    assert result.values["loss"][0] == pytest.approx(base[0][0] / base[0][1], rel=1e-5)
    with pytest.raises(QDyLoRAError, match="outside 1..8"):
        run_sweep(model, tok, rows, s.data, [1, 16], progress=False)
    with pytest.raises(QDyLoRAError, match="unknown metric"):
        run_sweep(model, tok, rows, s.data, [1], SweepSettings(metrics="meteor"), progress=False)


def test_cli_sweep_writes_table_json_csv_png(trained, capsys, tmp_path):
    run = trained[0]
    out = tmp_path / "sweep"
    argv = ["sweep", str(run), "--ranks", "1,2,8", "--max-new-tokens", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "recommended rank by loss" in printed
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["ranks"] == [0, 1, 2, 8] and set(saved["values"]["loss"]) == {"0", "1", "2", "8"}
    csv = (out / "sweep.csv").read_text().splitlines()
    columns = [f"{m}{part}" for m in ("loss", "perplexity", "exact_match") for part in ("", "_low", "_high", "_rows")]
    assert csv[0] == ",".join(["rank", "params", *columns])  # params: the adapter's size at that rank
    for line in csv[1:]:  # every value inside its interval
        cells = dict(zip(columns, line.split(",")[2:]))
        for m in ("loss", "exact_match"):
            assert float(cells[f"{m}_low"]) <= float(cells[m]) <= float(cells[f"{m}_high"])
    assert set(saved["intervals"]["loss"]) == {"0", "1", "2", "8"} and saved["confidence"] == 0.95
    assert saved["decisions"]["loss"]["recommended"] == str(saved["recommended"]["loss"])
    assert saved["settings"] == {**SweepSettings(ranks="1,2,8", max_new_tokens=3).to_dict()}  # what it was asked
    assert "[low, high]: the 95% interval" in printed and "at 95% confidence" in printed
    sizes = {line.split(",")[0]: int(line.split(",")[1]) for line in csv[1:]}
    assert sizes["0"] == 0 and sizes["2"] == 2 * sizes["1"] > 0 and saved["params"]["8"] == sizes["8"]
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == 2  # an earlier sweep is not overwritten silently
    assert "use --overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_cli_sweep_bad_input(trained, tmp_path, capsys, tiny_dir):
    run = trained[0]
    cases = [
        (["sweep", str(run), "--ranks", "1,99", "--out", str(tmp_path / "a")], "outside 1..8"),
        (["sweep", str(tmp_path), "--out", str(tmp_path / "b")], "not a qdylora run directory"),
        (["sweep", str(run), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "c")], "does not exist"),
        (["sweep", str(run), "--confidence", "1.5", "--out", str(tmp_path / "d")], "must be below 1, got 1.5"),
        (["sweep", str(run), "--confidence", "nan", "--out", str(tmp_path / "d")], "--confidence must be"),
        (["sweep", str(run), "--loss-tolerance", "-1", "--out", str(tmp_path / "d")], "--loss-tolerance must be"),
        (["sweep", str(run), "--accuracy-tolerance", "inf", "--out", str(tmp_path / "d")], "--accuracy-tolerance must"),
    ]
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text((run / "config.json").read_text())
    cases.append((["sweep", str(empty_run)], "has no adapter.safetensors"))
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "config.json").write_text((run / "config.json").read_text().replace(
        json.loads((run / "config.json").read_text())["settings"]["model"], tiny_dir("mistral")))
    (other / "adapter.safetensors").write_bytes((run / "adapter.safetensors").read_bytes())
    cases.append((["sweep", str(other)], "another base model"))
    for argv, message in cases:
        assert main(argv + ["--quiet"]) == 2, argv
        assert not (tmp_path / "d").exists()
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("qdylora: error:")]
        assert len(lines) == 1 and message in lines[0], (argv, err)


def test_adaptive_sweep_measures_a_subset_of_the_exhaustive_cells(trained):
    """On 200 rows: the adaptive sweep's entries measured on every row have exactly the
    exhaustive values (same rows, same order), the others were measured on a prefix of at least
    the first round, and nothing was measured twice."""
    run, model, tok, s = trained
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 11) for b in range(1, 21)]
    full = run_sweep(model, tok, rows, s.data, [1, 2, 4, 8], SweepSettings(metrics="loss", exhaustive=True),
                     progress=False)
    quick = run_sweep(model, tok, rows, s.data, [1, 2, 4, 8], SweepSettings(metrics="loss"), progress=False)
    assert not full.adaptive and quick.adaptive
    assert all(n == 200 for n in full.rows["loss"].values())
    assert all(32 <= n <= 200 for n in quick.rows["loss"].values())
    assert sum(quick.rows["loss"].values()) < sum(full.rows["loss"].values())  # something was decided early
    for r, n in quick.rows["loss"].items():
        head = full.row_stats["loss"][r][:n]  # the same seeded row order in both modes
        assert torch.allclose(quick.row_stats["loss"][r], head, rtol=1e-5, atol=1e-6)
        if n == 200:
            assert quick.values["loss"][r] == pytest.approx(full.values["loss"][r], rel=1e-5)
    assert quick.decisions["loss"].best in quick.ranks


def test_run_sweep_without_the_base_measures_the_same_values(trained):
    """`base=False` leaves rank 0 out (a study that measured it once on these rows) and changes
    nothing else."""
    _, model, tok, s = trained
    rows = [json.loads(x) for x in open(s.data.data).read().splitlines()[:8]]
    every_row = SweepSettings(max_new_tokens=3, exhaustive=True)
    with_base = run_sweep(model, tok, rows, s.data, [4], every_row, progress=False)
    alone = run_sweep(model, tok, rows, s.data, [4], every_row, progress=False, base=False)
    assert with_base.ranks == [0, 4] and alone.ranks == [4]
    for metric in ("loss", "exact_match"):
        assert set(alone.values[metric]) == {4}
        assert alone.values[metric][4] == pytest.approx(with_base.values[metric][4], rel=1e-6)
    assert alone.recommended["loss"] == 4
