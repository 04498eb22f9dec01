"""Is qdylora right and fast on this GPU? One command (`make gpu-check`), one line per check.

    .venv/bin/python benchmarks/gpu_check.py [--out gpu-check] [--quick]

Three checks, each in its own process with its own time limit (about 7 minutes in all on one
GPU), everything written under --out (logs, JSON, summary.txt):

  tests      the tests marked `cuda` (tests/test_cuda.py): the NF4 layer's forward and backward
             against float64 in bf16, per-example ranks, training with resume, the paged and
             in-backward optimizers, PEFT on transformers' CUDA 4-bit model, merge, generation
  speed      benchmarks/train_speed.py --device cuda --dtype bfloat16: qdylora against
             transformers + bitsandbytes + PEFT on SmolLM2-135M-Instruct, interleaved
  rank-study the rank study's smallest configuration (experiments/recipe_study.py, the cipher task,
             the default recipe and QLoRA rank 8, seed 0) beside this repo's CPU results

Exit status 0 when every check passed. Without a CUDA GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, cmd: list[str], out: Path, limit_s: int) -> tuple[int, str, float]:
    """Run `cmd` from the repository root with a time limit; its output goes to out/NAME.log."""
    start = time.perf_counter()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=limit_s)
        code, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        code = 124
        text = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + f"\n[stopped after {limit_s} s]"
    log.write_text(text)
    return code, text, time.perf_counter() - start


def check_tests(out: Path, limit_s: int, device: str) -> list[str]:
    code, text, seconds = run("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-rA", "-q", "--cuda-device",
                                        device, "tests/test_cuda.py"], out, limit_s)
    lines = [f"tests      {m.group(1):6s} {m.group(2)}"
             for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(\S+)", text, re.M)]
    tail = text.strip().splitlines()[-1] if text.strip() else "no output"
    lines.append(f"tests      {'ok' if code == 0 else 'FAILED'} ({tail}; {seconds:.0f} s, log {out / 'tests.log'})")
    return lines


def check_speed(out: Path, limit_s: int, quick: bool, device: str) -> list[str]:
    result = out / "train_speed.json"
    dtype = "bfloat16" if device == "cuda" else "float32"  # (bf16 is emulated on most CPUs)
    cmd = [sys.executable, "benchmarks/train_speed.py", "--device", device, "--dtype", dtype,
           "--steps", "1" if quick else "16", "--rounds", "1" if quick else "2", "--batch-size", "2" if quick else "8",
           "--only", "reference,reference-grouped,qdylora-r64,qdylora-sampled", "--json", str(result)]
    code, text, seconds = run("speed", cmd, out, limit_s)
    if code != 0 or not result.exists():
        return [f"speed      FAILED (exit {code}, {seconds:.0f} s, log {out / 'speed.log'})"]
    summary = json.loads(result.read_text())["summary"]
    ref = summary["reference"]
    lines, memory = [], "peak GPU memory" if device == "cuda" else "peak RSS"
    for name in ("reference-grouped", "qdylora-r64", "qdylora-sampled"):
        s = summary[name]
        lines.append(f"speed      {name:18s} {s['supervised_tok_s'] / ref['supervised_tok_s']:5.2f}x the reference's "
                     f"tokens/s ({s['supervised_tok_s']:.1f} vs {ref['supervised_tok_s']:.1f}), {memory} "
                     f"{s['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x "
                     f"({s['peak_rss_gib']:.2f} vs {ref['peak_rss_gib']:.2f} GiB)")
    lines.append(f"speed      ok ({seconds:.0f} s, table in {out / 'speed.log'})")
    return lines


def check_rank_study(out: Path, limit_s: int, quick: bool) -> list[str]:
    study = out / "recipe-study"
    cmd = ([sys.executable, "experiments/recipe_study.py", "--task", "cipher", "--runs", "full-svd,qlora-r8",
            "--seeds", "0", "--ranks", "1,8,64", "--out", str(study)]
           + (["--steps", "4", "--test-rows", "4"] if quick else []))
    code, text, seconds = run("rank-study", cmd, out, limit_s)
    lines = []
    cpu_results = ROOT / "experiments" / "recipe-study" / "results"
    for name in ("full-svd", "qlora-r8"):
        path = study / "results" / f"cipher-{name}-seed0.json"
        if not path.exists():
            continue
        loss = json.loads(path.read_text())["loss"]
        cpu = cpu_results / path.name
        cpu_loss = json.loads(cpu.read_text())["loss"] if cpu.exists() and not quick else {}
        shown = ", ".join(f"rank {r} {v:.3f}" + (f" (CPU {cpu_loss[r]:.3f})" if r in cpu_loss else "")
                          for r, v in loss.items())
        lines.append(f"rank-study cipher {name}: test answer loss {shown}")
    lines.append(f"rank-study {'ok' if code == 0 else 'FAILED'} "
                 f"(exit {code}, {seconds:.0f} s, log {out / 'rank-study.log'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the logs and summary.txt")
    parser.add_argument("--quick", action="store_true",
                        help="a step or a few, small batches (a smoke test of the script)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke-test the script here
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check")
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.device} (smoke test of the script)"
    header = (f"gpu-check: {name}, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    lines = [header]
    slower = 4 if args.device == "cpu" else 1  # the limits are a GPU's; a CPU smoke test gets more time
    for check in (lambda: check_tests(out, 200 * slower, args.device),
                  lambda: check_speed(out, 150 * slower, args.quick, args.device),
                  lambda: check_rank_study(out, 150 * slower, args.quick)):
        for line in check():
            print(line, flush=True)
            lines.append(line)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    failed = [line for line in lines if re.search(r"\b(FAILED|ERROR)\b", line)]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
