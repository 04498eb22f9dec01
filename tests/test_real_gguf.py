"""llama.cpp itself reads our GGUF export of a real run (slow; needs `pip install 'qdylora[gguf]'`).

A short run of the embedded SmolLM2-135M-Instruct on ASDiv, then experiments/gguf_check.py: the
adapter GGUF moves llama.cpp's logits as our adapter moves ours at ranks 1, 8 and 64 (on our NF4
base written as GGUF, within a tolerance derived from the two stacks' own distance), a wrongly
ordered adapter is caught, and the merged GGUF answers ASDiv prompts as our merged model does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_llama_cpp_reads_the_gguf_adapter_and_the_merged_model(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: make setup-gguf")
    run = tmp_path / "run"
    train = [sys.executable, "-m", "qdylora.cli", "train", "--out", str(run), "--max-steps", "8",
             "--micro-batch-size", "4", "--grad-accumulation", "1", "--lr", "1e-3", "--quiet"]
    done = subprocess.run(train, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "check.json"
    check = [sys.executable, str(ROOT / "experiments" / "gguf_check.py"), str(run), "--ranks", "1", "8", "64",
             "--prompts", "4", "--answers", "12", "--out", str(out)]
    done = subprocess.run(check, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["floor"]["nf4_base_gguf"]["top1"] > 0.99  # llama.cpp on our NF4 base is our NF4 base
    for b, entry in result["on_nf4_base"].items():
        assert entry["change_size"] > 0.01, f"rank {b}: the adapter hardly changes the logits: no check"
        assert entry["relative"] < entry["tolerance"], f"rank {b}: {entry}"
    control = result["control_unpermuted"]  # SmolLM2 is a llama: its q and k rows are permuted
    assert control["relative"] > 10 * control["tolerance"], control
    for merged in result["merged"]:
        enough = (0.9 if merged["dtype"] == "float16" else 0.75) * merged["answers"]
        assert merged["identical"] >= enough, merged
        assert merged["identical_with_its_chat_template"] >= enough, merged  # the file's own chat template
