"""Lengths capped at the positions a model reads: a GPT-2 of 64 learned positions and rows, prompts
and answers longer than that train, sweep and generate instead of failing mid-run."""

from __future__ import annotations

import json

import pytest

from qdylora.cli import main
from qdylora.core.context import context_length, fit_generation, fit_lengths

from ..conftest import char_tokenizer, tiny_model, write_sums


def test_fit_lengths_and_generation():
    assert fit_lengths(512, 256, None) == (512, 256) == fit_lengths(512, 256, 768)
    assert fit_lengths(512, 256, 128) == (64, 64)
    assert fit_lengths(512, 16, 128) == (112, 16)
    assert fit_generation(30, 20, 64) == (30, 20)
    assert fit_generation(300, 20, 64) == (44, 20)
    assert fit_generation(30, 500, 64) == (30, 32)
    assert fit_generation(300, 500, 64) == (32, 32)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model = tiny_model("gpt2")
    assert model.config.n_positions == 64 and context_length(model) == 64
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def test_rows_prompts_and_answers_longer_than_the_model_reads(gpt2_dir, tmp_path, capsys):
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    long_row = {"question": " ".join(["many words"] * 500) + " 1+1=", "answer": "2 " * 100}
    with open(data, "a") as f:
        f.write(json.dumps(long_row) + "\n")
    run = tmp_path / "run"
    code = main(["train", "--model", gpt2_dir, "--data", data, "--prompt-template", "{question}",
                 "--response-template", "{answer}", "--out", str(run), "--max-rank", "4", "--max-steps", "3",
                 "--micro-batch-size", "8", "--grad-accumulation", "1", "--compute-dtype", "float32",
                 "--eval-every", "0", "--save-every", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "the model reads at most 64 positions: prompts are cut at 32 tokens and responses at 32" in err
    assert json.loads((run / "summary.json").read_text())["status"] == "done"
    code = main(["generate", str(run), "--rank", "4", "--prompt", "x " * 300, "--max-new-tokens", "500"])
    err = capsys.readouterr().err
    assert code == 0 and "the answer at most 32 new tokens (asked: 500)" in err, err
    code = main(["sweep", str(run), "--data", data, "--ranks", "2,4", "--max-new-tokens", "100", "--quiet",
                 "--out", str(tmp_path / "sweep")])
    assert code == 0, capsys.readouterr().err
