"""Memory and time of reading many training rows: `qdylora train` on N tiny rows, two steps.

What a run holds per row decides how many rows fit: a child process runs `qdylora train` on a
JSONL file of N one-line sums ({"input": "3+4=", "output": "7"}, SmolLM2's tokenizer) with a
tiny random Llama (so the model is a few MB and the rows dominate), `--max-steps 2`, and reports
its peak RSS (`ru_maxrss` of that child, from `os.wait4`) and wall time; the bytes per row are the slope between
two sizes, so the model, the libraries and the interpreter cancel out.

    .venv/bin/python benchmarks/data_memory.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            f.write(json.dumps({"input": f"{a}+{b}=", "output": str(a + b)}) + "\n")


def tiny_model(path: Path) -> None:
    """A 2-layer Llama of width 64 with SmolLM2's tokenizer (49,152 tokens)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qdylora.data.embedded import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def one_run(model: Path, data: Path, out: Path) -> dict:
    """Peak RSS (bytes) and seconds of one `qdylora train` child."""
    command = [sys.executable, "-m", "qdylora.cli", "train", "--model", str(model), "--data", str(data),
               "--out", str(out), "--max-steps", "2", "--max-rank", "8", "--micro-batch-size", "4",
               "--grad-accumulation", "1", "--compute-dtype", "float32", "--quiet"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's so far
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"qdylora train failed ({child.returncode}): {err.read().strip()[-2000:]}")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", default="benchmarks/results/data_memory.json")
    args = parser.parse_args()
    sizes = sorted(args.rows)
    results = {"machine": machine.facts(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="qdylora-data-memory-") as tmp:
        root = Path(tmp)
        tiny_model(root / "model")
        for n in sizes:
            data = root / f"rows-{n}.jsonl"
            write_rows(data, n)
            run = {"rows": n, "file_bytes": data.stat().st_size, **one_run(root / "model", data, root / f"run-{n}")}
            data.unlink()
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
    runs = results["runs"]
    if len(runs) >= 2:
        slope = (runs[-1]["peak_rss_bytes"] - runs[0]["peak_rss_bytes"]) / (runs[-1]["rows"] - runs[0]["rows"])
        results["bytes_per_row"] = round(slope, 1)
        print(f"peak RSS grows by {slope:.0f} bytes a row ({runs[0]['rows']} -> {runs[-1]['rows']} rows); "
              f"10 M rows would add {slope * 1e7 / 2**30:.2f} GiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
