"""The `qdylora` command: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qdylora.cli import main


def test_info_prints_the_memory_report(tiny_dir, capsys):
    assert main(["info", "--model", tiny_dir("llama"), "--max-rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "14 adapted linear layers, max_rank 8" in out
    assert "frozen NF4 linears" in out


def test_info_json(tiny_dir, capsys):
    assert main(["info", "--model", tiny_dir("gpt2"), "--max-rank", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"]["params"] == 2 * (4 * (64 + 192) + 4 * (64 + 64) + 4 * (64 + 256) + 4 * (256 + 64))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--max-rank", "0"], "max_rank must be at least 1"),
        (["--target-modules", "query"], "matches no layer"),
        (["--compute-dtype", "float32", "--dropout", "1.5"], "dropout must be below 1, got 1.5"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, capsys, args, message):
    argv = ["info", "--model", tiny_dir("llama")] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("qdylora: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    """A real process: exit status 2 and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "qdylora", "info", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("qdylora: error: model path")
    assert "Traceback" not in proc.stderr


def test_unknown_flag_exits_2(capsys):
    assert main(["info", "--bogus"]) == 2
    assert capsys.readouterr().err == "qdylora: error: Unrecognized options: --bogus (see qdylora info --help)\n"


def test_third_party_noise_is_dropped_and_other_warnings_pass():
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" when it is
    imported on an AVX512-BF16 CPU (offline it cannot fetch that kernel, and uses its own): it
    was the first line of every command. The command line imports bitsandbytes only under its
    console, which drops that line and lets the logger's other warnings through."""
    code = """
import logging, sys
import qdylora.cli
assert "bitsandbytes" not in sys.modules and "torch" not in sys.modules  # the console comes first
from qdylora.console import shown_on_console
bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
with shown_on_console():
    bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
                    "you already `pip install kernels` and the kernels >= 0.11.1", "offline")
    bnb_log.warning("a real warning")
bnb_log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: outside a command")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["a real warning", "Failed to load CPU gemm_4bit_forward from "
                                        "kernels-community: outside a command"]


def test_library_messages_show_on_stderr_only_while_a_command_runs(capsys):
    from qdylora.console import log, shown_on_console

    before = (list(log.handlers), log.level, log.propagate)
    with shown_on_console():
        log.info("read 3 rows")
        log.warning("checkpoint x is damaged")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["qdylora: read 3 rows", "qdylora: warning: checkpoint x is damaged"]
    assert captured.out == ""  # stdout is the command's own output
    assert (list(log.handlers), log.level, log.propagate) == before


def test_quiet_hides_transformers_loading_bar_too(tiny_lm, tmp_path):
    """A real process: with --quiet nothing but our lines reach stderr (transformers' "Loading
    weights" bar was the first thing a quiet command printed)."""
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(12)))
    proc = subprocess.run([sys.executable, "-m", "qdylora", "train", "--model", tiny_lm, "--data", str(data),
                           "--prompt-template", "{question}", "--response-template", "{answer}", "--max-rank", "4",
                           "--max-steps", "1", "--out", str(tmp_path / "run"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(line.startswith("qdylora: ") for line in proc.stderr.splitlines() if line.strip()), proc.stderr[:2000]
