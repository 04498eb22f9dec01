"""`qdylora export`, `merge` and `generate` on a trained tiny run."""

from __future__ import annotations

import io
import json

import torch
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.cli import main
from qdylora.evaluation.generation import answer
from qdylora.training.rundir import load_run

from .conftest import VOCAB


def errors(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.startswith("qdylora: error:")]


def test_export_family_and_errors(trained_run, tmp_path, capsys):
    out = tmp_path / "family"
    assert main(["export", str(trained_run), "--ranks", "1,4", "--out", str(out)]) == 0
    for r in (1, 4):
        config = json.loads((out / f"rank-{r}" / "adapter_config.json").read_text())
        assert config["r"] == r and config["peft_type"] == "LORA"
    assert main(["export", str(trained_run), "--ranks", "1,4", "--out", str(out)]) == 2
    assert "already exists" in errors(capsys)[0]
    assert main(["export", str(trained_run), "--rank", "9", "--out", str(tmp_path / "x")]) == 2
    assert "outside 1..8" in errors(capsys)[0]
    assert main(["export", str(tmp_path), "--rank", "2", "--out", str(tmp_path / "y")]) == 2
    assert "not a qdylora run directory" in errors(capsys)[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_merge_cli_writes_a_loadable_model(trained_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(trained_run), "--rank", "4", "--out", str(out), "--dtype", "float32"]) == 0
    assert "adds a second rounding error" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model, _, _ = load_run(trained_run)
    model.eval()
    x = torch.randint(4, VOCAB - 4, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 4):
        torch.testing.assert_close(merged(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert main(["merge", str(trained_run), "--rank", "4", "--out", str(out)]) == 2
    assert "already exists" in errors(capsys)[0]


def test_generate_side_by_side_equals_one_rank_at_a_time(trained_run, capsys):
    model, tok, _ = load_run(trained_run)
    model.eval()
    together = answer(model, tok, "3+4=", [0, 2, 8], max_new_tokens=4)
    for r in (0, 2, 8):
        assert answer(model, tok, "3+4=", [r], max_new_tokens=4)[r] == together[r]
    assert together[0] != together[8]
    # the rank lists sweep and export take work here too: "0,2,8", and under --ranks
    for ranks in (["--rank", "0", "2", "8"], ["--rank", "0,2,8"], ["--ranks", "0,2,8"], ["--rank", "0", "2,8"]):
        assert main(["generate", str(trained_run), *ranks, "--prompt", "3+4=", "--max-new-tokens", "4"]) == 0
        printed = capsys.readouterr().out
        for r in (2, 8):
            assert f"[rank {r}]\n{together[r].strip()}" in printed
        assert "[rank 0 = base model]" in printed


def test_generate_streams_one_rank_and_reads_stdin(trained_run, capsys, monkeypatch):
    model, tok, _ = load_run(trained_run)
    model.eval()
    expected = answer(model, tok, "5+2=", [8], max_new_tokens=4)[8]
    monkeypatch.setattr("sys.stdin", io.StringIO("5+2="))
    assert main(["generate", str(trained_run), "--rank", "8", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[rank 8]\n") and expected.strip() in out


def test_generate_errors(trained_run, capsys, monkeypatch):
    assert main(["generate", str(trained_run), "--rank", "9", "--prompt", "x"]) == 2
    assert "outside 0..8" in errors(capsys)[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("  "))
    assert main(["generate", str(trained_run), "--rank", "2"]) == 2
    assert "empty prompt" in errors(capsys)[0]
