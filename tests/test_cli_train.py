"""`qdylora train`: flags, config files, resume, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest

from qdylora.cli import main

from .conftest import write_sums

FAST = ["--max-rank", "4", "--max-steps", "2", "--micro-batch-size", "4", "--grad-accumulation", "1",
        "--compute-dtype", "float32", "--quiet"]


def run_args(tiny_lm, data, out, *extra):
    return ["train", "--model", tiny_lm, "--data", data, "--prompt-template", "{question}",
            "--response-template", "{answer}", "--out", str(out), *FAST, *extra]


def test_train_then_resume_and_extend(tiny_lm, tmp_path, capsys):
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    out = tmp_path / "run"
    assert main(run_args(tiny_lm, data, out, "--save-every", "1")) == 0
    printed = capsys.readouterr().out
    assert "validation loss at rank 4:" in printed and f"run directory {out}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["train"]["max_steps"] == 2 and config["settings"]["adapter"]["max_rank"] == 4
    assert config["settings"]["adapter"]["compute_dtype"] == "float32"
    # --resume takes the saved settings; a flag given with it overrides them (here: more steps).
    assert main(["train", "--resume", str(out), "--max-steps", "4", "--quiet"]) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "rank" in x] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    # another global batch is refused, with the run's own product as the hint (it left out
    # the accumulation, and gave the new micro-batch as if it were the run's)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--max-steps", "6", "--micro-batch-size", "2", "--quiet"]) == 2
    assert "1 process x --micro-batch-size 4 x --grad-accumulation 1" in capsys.readouterr().err


def test_config_file_values_and_flag_overrides(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_lm}\ndata: {data}\nprompt-template: '{{question}}'\n"
                   "response_template: '{answer}'\nmax_rank: 4\nmin_rank: 4\nmax_steps: 3\nlr: 0.001\n"
                   "compute_dtype: float32\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--lr", "0.002", "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())["settings"]
    assert saved["train"]["lr"] == 0.002 and saved["train"]["max_steps"] == 3
    assert saved["adapter"]["max_rank"] == 4 and saved["data"]["prompt_template"] == "{question}"
    # A run's config.json is a valid --config for a new run.
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "config.json").read_text())["settings"]["train"]["lr"] == 0.002


def bad_cases(tmp_path):
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2="}\n')
    (tmp_path / "fields.jsonl").write_text('{"q": "1+1=", "a": "2"}\n')
    (tmp_path / "bad.yaml").write_text("max_rank: 4\nbogus: 1\n")
    (tmp_path / "list.yaml").write_text("train: [1, 2]\n")
    (tmp_path / "scalar.json").write_text('{"settings": 5}')
    tpl = ["--prompt-template", "{question}", "--response-template", "{answer}"]
    return [
        (["--data", str(tmp_path / "missing.jsonl")] + tpl, "data file", "does not exist"),
        (["--data", str(tmp_path / "empty.jsonl")] + tpl, "", "cannot read data|is empty"),
        (["--data", str(tmp_path / "nofield.jsonl")] + tpl, "",
         "row 1 has no answer (its fields with values: question)"),
        (["--data", str(tmp_path / "fields.jsonl")], "", "cannot tell the format"),
        (["--data", data, "--prompt-template", "{question}"], "", "needs --prompt-template and --response-template"),
        (["--data", data, "--format", "chat"], "", "row 0 has no messages"),
        (["--data", data, "--max-target-length", "1", "--max-source-length", "1", "--format", "text"], "", "no"),
        (["--data", data] + tpl + ["--min-rank", "9"], "", "min_rank"),
        (["--data", data] + tpl + ["--ranks", "2,99"], "", "99"),
        (["--data", data] + tpl + ["--eval-ranks", "99"], "", "eval_ranks"),
        (["--data", data] + tpl + ["--lr", "0"], "", "lr must be above 0, got 0.0"),
        (["--data", data] + tpl + ["--max-steps", "0"], "", "max_steps must be at least 1, got 0"),
        (["--data", data] + tpl + ["--config", str(tmp_path / "bad.yaml")], "", "unknown setting 'bogus'"),
        (["--data", data] + tpl + ["--config", str(tmp_path / "none.yaml")], "", "cannot read config file"),
        (["--data", data] + tpl + ["--config", str(tmp_path / "list.yaml")], "",
         "'train' must hold a mapping of its settings"),
        (["--data", data] + tpl + ["--config", str(tmp_path / "scalar.json")], "",
         "'settings' must hold a mapping of settings, got int"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_lm, tmp_path, capsys):
    import re

    for args, _, message in bad_cases(tmp_path):
        out = tmp_path / "run"
        argv = ["train", "--model", tiny_lm, "--out", str(out), "--max-rank", "8",
                "--compute-dtype", "float32", "--quiet", "--max-steps", "2"] + args
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("qdylora: error:")]
        assert code == 2, (args, err)
        assert len(errors) == 1 and (message in errors[0] or re.search(message, errors[0])), (args, err)
        assert "Traceback" not in err
        assert not out.exists(), args  # nothing half-written


def test_every_example_truncated_away_is_an_error(tiny_lm, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]}] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train", "--model", tiny_lm, "--data", str(data), "--out", str(tmp_path / "run"),
            "--max-source-length", "8", "--max-target-length", "4", *FAST]
    assert main(argv) == 2
    assert "no training example is left after tokenization" in capsys.readouterr().err


def test_existing_out_dir_is_refused_without_overwrite(tiny_lm, tmp_path, capsys):
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(run_args(tiny_lm, data, out)) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 2  # not a run: --overwrite refuses it too
    assert "not a qdylora run" in capsys.readouterr().err
    (out / "keep.txt").unlink()
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 0  # empty
    (out / "keep.txt").write_text("x")
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 0  # a run: replaced, the user's file kept
    assert (out / "keep.txt").read_text() == "x" and (out / "adapter.safetensors").is_file()


def test_overwrite_refuses_a_run_holding_a_users_file_or_a_link(tiny_lm, tmp_path, capsys):
    """--overwrite removed RUN/peft/ with a user's file in it, and with RUN/checkpoints a symbolic
    link deleted config, adapter and metrics, then failed: old run gone, no new one. Now both are
    refused in one line before anything is removed, and the old run stays whole."""
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    out = tmp_path / "run"
    assert main(run_args(tiny_lm, data, out)) == 0
    capsys.readouterr()
    whole = lambda: sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # noqa: E731
    (out / "peft").mkdir()
    (out / "peft" / "adapter_config.json").write_text("{}")  # an export of ours: may go
    (out / "peft" / "notes.md").write_text("mine")
    before = whole()
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "would remove" in err and "notes.md" in err and err.count("\n") == 1, err
    assert whole() == before and (out / "peft" / "notes.md").read_text() == "mine"
    (out / "peft" / "notes.md").unlink()
    elsewhere = tmp_path / "elsewhere"
    (out / "checkpoints").rename(elsewhere)
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before, held = whole(), sorted(p.name for p in elsewhere.iterdir())
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 2
    assert "checkpoints (a symbolic link)" in capsys.readouterr().err
    assert whole() == before and sorted(p.name for p in elsewhere.iterdir()) == held
    (out / "checkpoints").unlink()
    assert main(run_args(tiny_lm, data, out, "--overwrite")) == 0  # ours only: replaced
    assert (out / "adapter.safetensors").is_file() and not (out / "peft").exists()


def test_unknown_format_is_refused_by_the_parser(capsys):
    assert main(["train", "--out", "x", "--format", "yaml"]) == 2
    assert capsys.readouterr().err.startswith("qdylora: error: invalid choice 'yaml' for argument '--format'")


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--format", "--prompt-template", "--train-on-prompt", "--max-rank", "--min-rank",
                 "--ranks", "--update-mode", "--lr", "--schedule", "--max-grad-norm", "--grad-accumulation",
                 "--grad-checkpointing", "--eval-every", "--save-every", "--keep-last", "--resume",
                 "--overwrite", "--config"):
        assert flag in text, flag


def test_tensorboard_without_the_package_writes_nothing(tiny_lm, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    out = tmp_path / "run"
    assert main(run_args(tiny_lm, data, out, "--tensorboard")) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_names_its_model_and_data_from_any_directory(tiny_lm, tmp_path, monkeypatch, capsys):
    """`--model` and `--data` typed relative to the working directory are stored absolute: the
    run's commands work from elsewhere (a relative model path was taken for a hub id there)."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    write_sums(work / "sums.jsonl", n=24)
    monkeypatch.chdir(work)
    model = os.path.relpath(tiny_lm, work)
    assert main(run_args(model, "sums.jsonl", "run")) == 0
    settings = json.loads((work / "run" / "config.json").read_text())["settings"]
    assert settings["model"] == tiny_lm and settings["data"]["data"] == str(work / "sums.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(work / "run"), "--rank", "2", "--out", str(tmp_path / "peft")]) == 0
    assert main(["sweep", str(work / "run"), "--ranks", "2", "--metrics", "loss",
                 "--quiet"]) == 0, capsys.readouterr().err


def test_resume_on_changed_data_is_refused_and_sweep_warns(tiny_lm, tmp_path, capsys):
    """Edit the training file (more rows, other answers) after a run: --resume went on silently on
    new rows with a new validation split, and a sweep without --data measured other rows."""
    data = tmp_path / "sums.jsonl"
    write_sums(data, n=24)
    out = tmp_path / "run"
    assert main(run_args(tiny_lm, str(data), out, "--save-every", "1")) == 0
    saved = json.loads((out / "config.json").read_text())["data_fingerprint"]
    assert set(saved) == {"train", "validation"} and saved["train"] != saved["validation"]
    write_sums(data, n=30, seed=1)
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["train", "--resume", str(out), "--max-steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "its train and validation rows changed since the run started" in err, err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main(["sweep", str(out), "--ranks", "2", "--metrics", "loss", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert "differ from the rows it was validated on" in capsys.readouterr().err
    write_sums(data, n=24)  # the original rows again: resume goes on
    assert main(["train", "--resume", str(out), "--max-steps", "3", "--quiet"]) == 0


def test_a_tokenizer_without_pad_or_eos_trains_and_says_what_it_lacks(tiny_lm, tmp_path, capsys):
    """A tokenizer with neither a padding nor an end-of-sequence token was a TypeError in the
    middle of `train`; padding is masked, so any id pads, and the missing end token is said."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_lm, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(eos_token=None, pad_token=None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_sums(tmp_path / "sums.jsonl", n=24)
    assert main(run_args(str(model), data, tmp_path / "run")) == 0
    assert "the tokenizer has no end-of-sequence token" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
