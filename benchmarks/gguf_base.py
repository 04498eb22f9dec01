"""Training step time and memory: the frozen base in NF4 against the GGUF file's own blocks
(`--base-format`, issue 40), interleaved in one process (nf4, gguf, nf4, gguf, ...) on the same
batch of 8 ASDiv training rows, forward and backward at rank 64, the run's compute dtype.

    .venv/bin/python benchmarks/gguf_base.py                      # the embedded SmolLM2 (Q4_1)
    .venv/bin/python benchmarks/gguf_base.py --model ~/.cache/qdylora/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M

Prints one JSON object: median step seconds of each, their ratio, the frozen linears' bytes and
where a GGUF step's extra time goes (the dequantizations: seconds per step of dequantizing every
frozen weight twice, measured alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a checkpoint converted from a GGUF (default: the embedded SmolLM2)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import qdylora
    from qdylora.data.batching import pad_token_id
    from qdylora.data.datasets import load_data
    from qdylora.data.embedded import smollm2_checkpoint
    from qdylora.data.settings import DataSettings
    from qdylora.core.loading import load_tokenizer, resolve_source
    from qdylora.core.gguf_linear import GGUFLinear
    from qdylora.training.calibration import calibration_batches

    source = args.model or smollm2_checkpoint()
    models = {fmt: qdylora.prepare(source, qdylora.QDyLoRAConfig(base_format=fmt), device="cpu")
              for fmt in ("nf4", "gguf")}
    tokenizer = load_tokenizer(resolve_source(str(source)))
    data = load_data(DataSettings().with_embedded_default(), 0, tokenizer)
    batch = calibration_batches(data.train, 8, 0, 8, pad_token_id(tokenizer), torch.device("cpu"))[0]
    times: dict[str, list[float]] = {fmt: [] for fmt in models}
    for _ in range(args.repeats + 1):  # the first round warms up
        for fmt, model in models.items():
            model.train()
            start = time.perf_counter()
            model(**batch).loss.backward()
            times[fmt].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    bases = [m for m in models["gguf"].modules() if isinstance(m, GGUFLinear)]
    start = time.perf_counter()
    for m in bases:
        m.dequantized().to(models["gguf"].qdylora_config.torch_compute_dtype)
    dequant = time.perf_counter() - start
    step = {fmt: statistics.median(t[1:]) for fmt, t in times.items()}
    report = {"machine": machine.facts(), "model": str(source), "rows": int(batch["input_ids"].shape[0]),
              "tokens": int(batch["attention_mask"].sum()),
              "step_seconds": step, "ratio_gguf_over_nf4": step["gguf"] / step["nf4"],
              "gguf_dequantize_seconds_per_step": 2 * dequant,  # forward and backward each dequantize once
              "frozen_bytes": {fmt: qdylora.memory_report(m).quantized.bytes for fmt, m in models.items()},
              "types": sorted({m.extra_repr().split("type=")[1].split(",")[0] for m in bases})}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
