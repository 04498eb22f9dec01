"""The spectrum of a trained adapter's deltas over training (issue 39, hypothesis 5).

    .venv/bin/python experiments/spectrum.py RUN_OR_PEFT_DIR [...] [--out FILE.json]

For every layer, the delta D = s B A of the adapter as trained (a qdylora run's checkpoints, each
step-N kept, in the order trained, with the run's scale at its max rank; or a PEFT adapter
directory, alpha / r): its singular values sigma_1 >= sigma_2 >= ... Reported per step, over
layers: the median of sigma_1 (how far the largest direction moved), the mean share of the
squared Frobenius norm in the first 1 / 8 / 16 components (how concentrated the delta is: what an
SVD cut at that rank keeps), and the median Frobenius norm.

Singular values go through the thin QRs of the factors (an R x R problem, as `core.ordering`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

KEEP = (1, 8, 16)


def singular_values(A: torch.Tensor, B: torch.Tensor, c: float) -> torch.Tensor:
    """sigma of c B A, descending (A: (R, in), B: (out, R); float64)."""
    _, rb = torch.linalg.qr(B.double())  # (k1, R)
    _, ra = torch.linalg.qr(A.double().T)  # (k2, R)
    return torch.linalg.svdvals(c * rb @ ra.T)


def summarize(sigmas: list[torch.Tensor]) -> dict:
    """Over layers: median sigma_1, mean energy share of the first k components, median norm."""
    shares = {k: [] for k in KEEP}
    for s in sigmas:
        energy = float((s**2).sum())
        for k in KEEP:
            shares[k].append(float((s[:k] ** 2).sum()) / energy if energy > 0 else 0.0)
    return {"sigma1_median": statistics.median(float(s[0]) for s in sigmas),
            "norm_median": statistics.median(float(s.norm()) for s in sigmas),
            **{f"energy_top{k}": statistics.mean(shares[k]) for k in KEEP}, "layers": len(sigmas)}


def run_spectrum(run: Path) -> list[dict]:
    """Per kept checkpoint of a qdylora run (the factors as trained)."""
    from safetensors.torch import load_file

    from qdylora.core.scaling import scale

    config = json.loads((run / "config.json").read_text())
    adapter = config.get("settings", config).get("adapter", config.get("adapter"))
    c = scale(adapter["alpha"], adapter["max_rank"], adapter["scaling"], adapter["max_rank"])
    out = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        tensors = load_file(str(ckpt / "adapter.safetensors"))
        names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_A")})
        sigmas = [singular_values(tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"], c) for n in names]
        out.append({"step": int(ckpt.name.split("-")[1]), **summarize(sigmas)})
    return out


def peft_spectrum(adapter: Path) -> list[dict]:
    """The final adapter of a PEFT run (one entry, step = None)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    c = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    names = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    sigmas = [singular_values(tensors[f"{n}.lora_A.weight"], tensors[f"{n}.lora_B.weight"], c) for n in names]
    return [{"step": None, **summarize(sigmas)}]


def spectrum(path: Path) -> list[dict]:
    """A qdylora run directory (its checkpoints) or a PEFT adapter directory."""
    if (path / "adapter_config.json").exists():
        return peft_spectrum(path)
    if (path / "adapter" / "adapter_config.json").exists():
        return peft_spectrum(path / "adapter")
    if (path / "checkpoints").is_dir():
        return run_spectrum(path)
    sys.exit(f"{path}: neither a qdylora run with checkpoints nor a PEFT adapter directory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write {path: [per step]} as JSON here too")
    args = ap.parse_args()
    found = {}
    print("| run | step | median sigma_1 | median norm | energy top 1 | top 8 | top 16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in args.paths:
        found[str(path)] = rows = spectrum(path)
        for r in rows:
            print(f"| {path.name} | {r['step'] if r['step'] is not None else 'final'} | {r['sigma1_median']:.4f} | "
                  f"{r['norm_median']:.4f} | {r['energy_top1']:.3f} | {r['energy_top8']:.3f} | "
                  f"{r['energy_top16']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
