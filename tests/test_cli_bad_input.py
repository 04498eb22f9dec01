"""Bad input not covered elsewhere (see docs/reliability.md for the whole table): runs from a
newer qdylora, unwritable outputs, untrusted settings, --debug."""

from __future__ import annotations

import json
import shutil

import pytest

from qdylora.cli import main
from qdylora.training.rundir import load_run_settings

from .conftest import write_sums


def one_error_line(capsys, code: int, message: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qdylora: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def copy_run(trained_run, tmp_path, edit):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    record = json.loads((run / "config.json").read_text())
    edit(record)
    (run / "config.json").write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("command", [["sweep"], ["export", "--rank", "2"], ["merge", "--rank", "2"],
                                     ["generate", "--prompt", "1+1="]])
def test_run_from_a_newer_qdylora_is_refused(trained_run, tmp_path, capsys, command):
    run = copy_run(trained_run, tmp_path, lambda r: r.update(qdylora_version="99.0"))
    argv = [command[0], str(run)] + command[1:]
    if command[0] in ("export", "merge"):
        argv += ["--out", str(tmp_path / "out")]
    one_error_line(capsys, main(argv), "written by qdylora 99.0, newer than this qdylora")
    assert not (tmp_path / "out").exists()


def test_resume_of_a_run_from_a_newer_qdylora_is_refused(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path, lambda r: r.update(qdylora_version="99.0"))
    before = sorted(p.name for p in run.rglob("*"))
    one_error_line(capsys, main(["train", "--resume", str(run), "--out", str(run), "--quiet"]),
                   "newer than this qdylora")
    assert sorted(p.name for p in run.rglob("*")) == before


def test_saved_trust_remote_code_is_not_honoured(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path, lambda r: r["settings"].update(trust_remote_code=True))
    settings, _ = load_run_settings(run)
    assert settings.trust_remote_code is False
    assert load_run_settings(run, trust_remote_code=True)[0].trust_remote_code is True


def test_unwritable_output_directory(tiny_lm, tmp_path, capsys):
    data = write_sums(tmp_path / "sums.jsonl")
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    for out in (blocker / "run", "/proc/qdylora-cannot-write-here"):
        code = main(["train", "--model", tiny_lm, "--data", data, "--prompt-template", "{question}",
                     "--response-template", "{answer}", "--out", str(out), "--max-steps", "1", "--quiet",
                     "--compute-dtype", "float32"])
        one_error_line(capsys, code, str(out).split("/")[1])
    assert blocker.read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not a qdylora run directory"):
        main(["sweep", str(tmp_path), "--debug"])


@pytest.mark.parametrize("argv, message", [
    (["merge", "{run}", "--rank", "9", "--out", "{tmp}/m"], "outside 1..8"),
    (["export", "{run}", "--ranks", "0,2", "--out", "{tmp}/e"], "outside 1..8"),
    (["sweep", "{run}", "--ranks", "1,9", "--out", "{tmp}/s"], "outside 1..8"),
    (["sweep", "{run}", "--ranks", "0", "--out", "{tmp}/s"], "measures the base model only"),  # was a traceback
    (["generate", "{run}", "--rank", "-1", "--prompt", "x"], "outside 0..8"),
])
def test_rank_out_of_range_in_every_run_command(trained_run, tmp_path, capsys, argv, message):
    argv = [a.format(run=trained_run, tmp=tmp_path) for a in argv]
    one_error_line(capsys, main(argv + ["--quiet"] if argv[0] == "sweep" else argv), message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["sweep"], ["export", "--rank", "2"], ["merge", "--rank", "2"],
                                     ["generate", "--prompt", "1+1="]])
def test_a_flipped_byte_in_the_run_adapter_is_refused(trained_run, tmp_path, capsys, command):
    """The run's top-level adapter.safetensors: a flipped byte exported silently."""
    from .training.test_adapter_file import flip_a_data_byte

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    flip_a_data_byte(run / "adapter.safetensors")
    out = [] if command[0] in ("sweep", "generate") else ["--out", str(tmp_path / "out")]
    code = main([command[0], str(run), *command[1:], *out])
    one_error_line(capsys, code, "adapter.safetensors is damaged: its tensors do not match their checksum")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["merge", "RUN", "--rank", "4", "--out", "D", "--dtype", "float64"],
     "invalid choice 'float64' for argument '--dtype'. Expected one of ('bfloat16', 'float16', 'float32', "
     "'bf16', 'fp16', 'fp32', 'q8_0'). (see qdylora merge --help)"),
    (["train", "--lr", "abc"],
     "Error parsing --lr: could not convert string to float: 'abc' (see qdylora train --help)"),
    (["sweep"], "(see qdylora sweep --help)"),
    (["bogus"], "Unrecognized options: bogus (see qdylora --help)"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    """tyro's usage errors were a box of several lines."""
    code = main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qdylora: error: "), err
    assert code == 2 and message in err


def test_short_dtype_names_are_accepted(trained_run, tmp_path, capsys):
    from qdylora import QDyLoRAConfig

    assert QDyLoRAConfig(compute_dtype="bf16").compute_dtype == "bfloat16"
    assert QDyLoRAConfig(compute_dtype="fp32").compute_dtype == "float32"
    out = tmp_path / "merged"
    assert main(["merge", str(trained_run), "--rank", "2", "--out", str(out), "--dtype", "fp32"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "(float32)" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_saved_on_a_gpu_opens_on_a_cpu(trained_run, tmp_path, capsys):
    """The saved device is a preference: generate, sweep and export use this machine's device."""
    run = copy_run(trained_run, tmp_path, lambda r: r["settings"].update(device="cuda"))
    assert main(["generate", str(run), "--prompt", "1+1=", "--max-new-tokens", "2"]) == 0
    assert main(["export", str(run), "--rank", "2", "--out", str(tmp_path / "peft")]) == 0
    from qdylora.cli import _usable

    assert _usable("cuda") is None and _usable("cpu") == "cpu"  # a resumed run goes on here too


def test_non_utf8_prompt_on_standard_input_is_one_line(trained_run, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("1+1=".encode() + b"\xff\xfe")))
    one_error_line(capsys, main(["generate", str(trained_run), "--max-new-tokens", "2"]),
                   "the prompt on standard input is not UTF-8 text (byte 4)")


def test_merge_into_the_runs_own_base_model_is_refused(trained_run, tiny_lm, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_lm, base)
    run = copy_run(trained_run, tmp_path, lambda r: r["settings"].update(model=str(base)))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in base.iterdir())
    for out in (base, tmp_path):  # the base itself, or a folder holding it
        one_error_line(capsys, main(["merge", str(run), "--rank", "2", "--out", str(out), "--overwrite"]),
                       "holds the run's base model")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in base.iterdir()) == before
