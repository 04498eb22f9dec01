"""Read PEFT exports of per-layer ranks with vLLM's own config parser and compare what vLLM would
apply to every module with what PEFT applies (which the tests check against qdylora's logits).

Run it with a Python that has vLLM (not a qdylora dependency), on exports of one allocation in
both layouts:

    qdylora export RUN --allocation output-r1 --out /tmp/alloc-patterns
    qdylora export RUN --allocation output-r1 --layout padded --out /tmp/alloc-padded
    VLLM_PYTHON experiments/vllm_config_check.py /tmp/alloc-patterns /tmp/alloc-padded

For each export: `PEFTHelper.from_local_dir` (vllm/lora/peft_helper.py), `validate_legal` with
`LoRAConfig(max_lora_rank=...)` at the smallest accepted value >= the adapter's rank, then per
module vLLM's (rank, scaling) -> delta = scaling * B[:, :rank] A[:rank] from the file's tensors,
against PEFT's reading of the same file (lora_alpha_l / r_l from the patterns, or / sqrt(r_l)
with rsLoRA). Prints one line per export and the largest difference between the two exports'
deltas (the same adapter, so it should be float rounding only).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def peft_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """PEFT's rank and alpha of `module` (peft.utils.other.get_pattern_key's rule)."""
    def match(pattern: dict):
        return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), None)
    r = match(config.get("rank_pattern") or {}) or config["r"]
    alpha = match(config.get("alpha_pattern") or {}) or config["lora_alpha"]
    return r, alpha


def deltas(export: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (delta as vLLM reads it, delta as PEFT reads it), float64."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    config = json.loads((export / "adapter_config.json").read_text())
    helper = PEFTHelper.from_local_dir(str(export), max_position_embeddings=None)
    top = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    max_lora_rank = next(v for v in (8, 16, 32, 64, 128, 256, 320, 512) if v >= top)
    helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank))  # raises on what vLLM refuses
    tensors = load_file(export / "adapter_model.safetensors")
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        A, B = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        r_vllm, s_vllm = helper.get_rank_and_scaling(module)
        r_peft, alpha = peft_rank_alpha(config, module)
        s_peft = alpha / (r_peft**0.5 if config.get("use_rslora") else r_peft)
        assert A.shape[0] == r_peft == r_vllm, (module, A.shape, r_peft, r_vllm)
        out[module] = (s_vllm * B[:, :r_vllm] @ A[:r_vllm], s_peft * B @ A)
    print(f"{export}: vLLM parsed r={config['r']}, {len(config.get('rank_pattern') or {})} rank_pattern entries, "
          f"max_lora_rank {max_lora_rank} accepted, {len(out)} modules; vLLM vs PEFT largest delta difference "
          f"{max(float((v - p).abs().max()) for v, p in out.values()):.2e}")
    return out


def main() -> None:
    exports = [Path(p) for p in sys.argv[1:]]
    read = [deltas(e) for e in exports]
    if len(read) == 2:
        a, b = read
        assert set(a) == set(b), "the two exports adapt different modules"
        diff = max(float((a[m][0] - b[m][0]).abs().max()) for m in a)
        size = max(float(a[m][0].abs().max()) for m in a)
        print(f"the two layouts under vLLM: largest delta difference {diff:.2e} (largest delta entry {size:.2e})")


if __name__ == "__main__":
    main()
