"""Per-layer ranks under a budget from the command line: `sweep --budgets`, `export --budget /
--allocation` (both layouts), `merge` and `generate` with an allocation, and their errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qdylora
from qdylora import QDyLoRAError
from qdylora.cli import main
from qdylora.evaluation.budgets import AllocationRequest, read_allocation
from qdylora.training.adapter_file import save_adapter
from qdylora.training.rundir import load_run

from .conftest import VOCAB, transformers_4bit, write_sums

peft = pytest.importorskip("peft")


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the shared trained run (these commands write allocations into it)."""
    return shutil.copytree(trained_run, tmp_path / "run")


def errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("qdylora: error:")]


def test_sweep_budgets_measures_allocations_beside_ranks(run, tmp_path, capsys):
    data = write_sums(tmp_path / "test.jsonl", n=12, seed=5)
    assert main(["sweep", str(run), "--data", str(data), "--metrics", "loss,exact_match", "--max-new-tokens", "3",
                 "--ranks", "1,2,8",
                 "--budgets", "1,2", "--scores", "svd,output,loss", "--calibration-rows", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "output-r2" in out and "params" in out and "smallest adapter within tolerance by loss" in out
    sweep = json.loads((run / "sweep.json").read_text())
    names = [f"{s}-r{b}" for s in ("svd", "output", "loss") for b in (1, 2)]
    assert all(n in sweep["values"]["loss"] for n in names)
    for n in names:  # equal size or smaller than the uniform rank of the same budget
        assert sweep["params"][n] <= sweep["params"][n[-1]]
        assert (run / "allocations" / f"{n}.json").is_file()
    assert sweep["recommended"]["loss"] in (1, 2, 8) and sweep["smallest"]["loss"]
    assert "svd-r2" in sweep["values"]["exact_match"] and "svd-r2" in sweep["samples"]  # generation too
    assert (run / "calibration.safetensors").is_file()
    csv = (run / "sweep.csv").read_text().splitlines()
    assert csv[0].startswith("rank,params,loss") and any(line.startswith("loss-r2,") for line in csv)


def test_export_an_allocation_in_both_layouts_reproduces_our_logits(run, tmp_path, capsys):
    model, _, _ = load_run(run)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    for layout, flags in (("patterns", ["--budget", "2", "--score", "output", "--calibration-rows", "8"]),
                          ("padded", ["--allocation", "output-r2"])):
        out = tmp_path / layout
        assert main(["export", str(run), *flags, "--layout", layout, "--out", str(out)]) == 0
        allocation = read_allocation(run, "output-r2", list(model.adapter_layers()), 8)
        with torch.no_grad(), qdylora.at_rank(model.eval(), allocation):
            ours = model(input_ids=x).logits
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(transformers_4bit(model.base_model_name_or_path, torch.float32),
                                                    out).eval()(input_ids=x).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert "serve with vLLM --max-lora-rank" in capsys.readouterr().out


def test_merge_and_generate_take_an_allocation(run, tmp_path, capsys):
    assert main(["merge", str(run), "--budget", "1", "--out", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
    assert (run / "allocations" / "svd-r1.json").is_file()  # the default score: singular values, no data
    assert not (run / "calibration.safetensors").exists()
    assert main(["generate", str(run), "--allocation", "svd-r1", "--rank", "0", "--prompt", "1+2=",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[allocation svd-r1]" in out and "[rank 0 = base model]" in out


def test_allocations_are_kept_and_remade_for_a_changed_adapter(run):
    model, tokenizer, settings = load_run(run)
    request = AllocationRequest(budget="1", score="output", calibration_rows=8)
    first = request.resolve(run, model, tokenizer, settings)
    path = run / "allocations" / "output-r1.json"
    stamp = path.stat().st_mtime_ns
    assert request.resolve(run, model, tokenizer, settings) == first and path.stat().st_mtime_ns == stamp
    with torch.no_grad():  # a different adapter (retrained): the kept allocation is stale
        for layer in model.adapter_layers().values():
            layer.lora_B.mul_(torch.linspace(0.1, 3, layer.lora_B.shape[1]))
    save_adapter(model, run / "adapter.safetensors")
    model, tokenizer, settings = load_run(run)
    request.resolve(run, model, tokenizer, settings)
    assert path.stat().st_mtime_ns != stamp
    # edited by hand to twice its budget: was used silently; now refused, the file kept as it is
    record = json.loads(path.read_text())
    record["ranks"] = {name: min(8, 2 * b + 2) for name, b in record["ranks"].items()}
    path.write_text(json.dumps(record))
    edited = path.read_text()
    with pytest.raises(QDyLoRAError, match="more than its budget 1 .*edited after it was made.*--allocation output-r1"):
        request.resolve(run, model, tokenizer, settings)
    assert path.read_text() == edited


def test_budget_errors_are_one_line(run, tmp_path, capsys):
    cases = [
        (["export", str(run), "--budget", "two", "--out", str(tmp_path / "a")], "cannot read the budget"),
        (["export", str(run), "--budget", "1", "--rank", "2", "--out", str(tmp_path / "a")], "exactly one of"),
        (["export", str(run), "--allocation", "nope", "--out", str(tmp_path / "a")], "no allocation 'nope'"),
        (["merge", str(run), "--out", str(tmp_path / "a")], "exactly one of"),
        (["sweep", str(run), "--budgets", "1", "--scores", "magic", "--out", str(tmp_path / "s")], "unknown score"),
        (["export", str(run), "--budget", "1", "--calibration-rows", "-3", "--out", str(tmp_path / "a")],
         "--calibration-rows must be at least 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        lines = errors(capsys)
        assert len(lines) == 1 and message in lines[0], (argv, lines)
    assert not (tmp_path / "a").exists() and not (run / "allocations").exists()


def test_budgets_need_an_svd_ordered_adapter(tiny_lm, tmp_path):
    from qdylora.evaluation.budgets import allocate_run
    from qdylora.errors import QDyLoRAError

    model = qdylora.prepare(tiny_lm, qdylora.QDyLoRAConfig(max_rank=4, scaling="rslora", compute_dtype="float32"))
    with pytest.raises(QDyLoRAError, match="SVD order"):
        allocate_run(tmp_path, model, None, None, "1", "svd")


def test_reorder_writes_a_new_run_in_a_data_aware_order(run, tmp_path, capsys):
    new = tmp_path / "loss-order"
    assert main(["reorder", str(run), "--out", str(new), "--order", "loss", "--calibration-rows", "8"]) == 0
    assert (new / "config.json").is_file() and (new / "adapter.safetensors").is_file()
    ours, _, _ = load_run(run)
    theirs, _, _ = load_run(new)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for rank, same in ((8, True), (1, False)):
            with qdylora.at_rank(ours.eval(), rank), qdylora.at_rank(theirs.eval(), rank):
                a, b = ours(input_ids=x).logits, theirs(input_ids=x).logits
            if same:  # the full delta is unchanged
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            else:  # the cut is another one
                assert (a - b).abs().max() > 1e-3
    assert main(["export", str(new), "--budget", "1", "--out", str(tmp_path / "peft")]) == 0  # a run like any
    for argv, message in ((["reorder", str(run), "--out", str(new)], "already exists"),
                          (["reorder", str(run), "--out", str(run)], "new directory"),
                          (["reorder", str(run), "--out", str(tmp_path / "x"), "--order", "magic"], "magic"),
                          (["reorder", str(run), "--out", str(tmp_path / "x"), "--calibration-rows", "-1"],
                           "--calibration-rows must be at least 0")):
        capsys.readouterr()
        assert main(argv) == 2
        lines = errors(capsys)
        assert len(lines) == 1 and message in lines[0], (argv, lines)
