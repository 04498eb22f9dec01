"""benchmarks/scale_train.py on a small shape: the code path of the 30B-shaped run (NF4 with the
frozen weights in bfloat16, 8-bit AdamW stepped in backward, gradient checkpointing, sampled
ranks, the sweep and the PEFT export, memory sampled from /proc) end to end in one real process
tree. Slow (a tokenizer is trained and a checkpoint written): `make test-slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_scale_benchmark_runs_its_whole_pipeline_on_a_small_shape(tmp_path):
    result_file, run = tmp_path / "result.json", tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_train.py"), "--shape", "tiny",
                           "--steps", "3", "--keep", str(tmp_path / "ckpt"), "--out", str(run),
                           "--json", str(result_file)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert set(result["peaks"]) >= {"load", "train", "sweep", "export"}
    assert all(p["anon"] > 0 and p["min_available"] > 0 for p in result["peaks"].values())
    assert result["memory_report"]["other"]["bits_per_param"] < 16.5  # embeddings and head in bf16
    assert [m["step"] for m in result["step_metrics"]] == [1, 2, 3]
    assert len({m["rank"] for m in result["step_metrics"]}) > 1  # sampled ranks
    assert all(m["grad_norm"] > 0 for m in result["step_metrics"])  # applied in backward
    state_bytes, adapter_params = result["optimizer_state_bytes"], result["memory_report"]["adapter"]["params"]
    assert state_bytes < 2.5 * adapter_params  # 8-bit moments (2 bytes per parameter + absmax), not 8
    assert set(result["sweep_loss"]) == {"0", "8", "64"}
    config = json.loads((run / "peft-rank-8" / "adapter_config.json").read_text())
    assert config["r"] == 8
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["scaling"] == "nested"  # saved SVD-ordered
    assert "peak anonymous memory, whole run" in proc.stdout
