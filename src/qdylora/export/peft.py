"""Export one rank (or one allocation of per-layer ranks) of a QDyLoRA adapter as a standard
PEFT LoRA adapter.

At rank b the adapter is s(b) * B[:, :b] A[:b]; PEFT's LoRA at r = b computes
lora_alpha / r * lora_B lora_A (or lora_alpha / sqrt(r) with use_rslora), so r = b,
lora_alpha = alpha and use_rslora = (scaling == "rslora") give exactly our scale; for the
"nested" rule (s(b) = alpha / sqrt(R) at every b) lora_alpha = s * b without rslora.

An allocation (layer l at rank b_l) has two layouts:

    patterns  PEFT's own: r and lora_alpha of the most common rank, `rank_pattern` and
              `alpha_pattern` for the other layers (lora_alpha_l = s(b_l) * b_l, no rslora);
              the smallest files, read right by PEFT and by vLLM 0.32's PEFTHelper
    padded    for servers that ignore those patterns (vLLM's PEFT loader before it read them
              applied one lora_alpha / r to every module, vllm/lora/peft_helper.py): every
              layer's s(b_l) folded into lora_B, zero-padded to one r = max b_l, lora_alpha = r,
              no rslora (serve with vLLM's max_lora_rank >= r: `vllm_max_lora_rank`)

Both were read with vLLM 0.32's own parser (experiments/vllm_config_check.py): the same delta
per module as PEFT's reading, in either layout.

Layers at rank 0 are left out of target_modules (PEFT has no rank-0 LoRA).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from safetensors.torch import save_file

from ..core.allocation import Allocation, layer_rank
from ..core.model import QDyLoRAModel
from ..core.gains import rank_gains
from ..core.scaling import scale
from ..core.targets import uses_conv1d
from ..errors import QDyLoRAError
from ..files import atomic_dir, refuse_existing
from . import PEFT_FILES
from .opening import export_targets, open_run
from ..training.sampling import check_ranks

if TYPE_CHECKING:
    from ..evaluation.budgets import AllocationRequest

PEFT_PREFIX = "base_model.model."


def peft_target_modules(model: QDyLoRAModel, adapted: Optional[set[str]] = None) -> Union[list[str], str]:
    """PEFT's target_modules for exactly our adapted layers (or the subset `adapted`): their leaf
    names when those select no other module (what vLLM and most tools expect), else an anchored
    regex of the paths."""
    adapted = set(model.adapter_layers()) if adapted is None else adapted
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    selected = {name for name, _ in model.model.named_modules()
                if name and name.rsplit(".", 1)[-1] in leaves and ".base" not in name
                and not name.endswith((".lora_A", ".lora_B", ".dropout"))}
    if selected == adapted:
        return leaves
    return "^(?:" + "|".join(re.escape(p) for p in sorted(adapted)) + ")$"


# What an export writes (and all that --overwrite may replace).
LAYOUTS = ("patterns", "padded")
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def vllm_max_lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that serves an adapter of rank r."""
    return next((v for v in VLLM_RANKS if v >= r), r)


def peft_config(model: QDyLoRAModel, rank: Union[int, Allocation], fan_in_fan_out: bool,
                layout: str = "patterns") -> dict:
    """adapter_config.json for `rank` (PEFT 0.x LoRA fields): see the module doc for the layouts."""
    c, gains = model.qdylora_config, rank_gains(model)
    ranks = {p: layer_rank(rank, p) for p in model.adapter_layers()}
    used = {p: b for p, b in ranks.items() if b > 0}
    # PEFT: alpha_l / b_l = s(b_l)
    alphas = {p: scale(c.alpha, b, c.scaling, c.max_rank, gains) * b for p, b in used.items()}
    rank_pattern, alpha_pattern = {}, {}
    if layout == "padded":
        r = max(used.values())
        alpha, rslora = r, False
    elif isinstance(rank, int):
        r, rslora = rank, c.scaling == "rslora" and gains is None
        alpha = alphas[next(iter(used))] if c.scaling == "nested" or gains is not None else c.alpha
    else:
        values = list(used.values())
        r = max(set(values), key=lambda b: (values.count(b), b))  # the most common rank
        alpha, rslora = scale(c.alpha, r, c.scaling, c.max_rank, gains) * r, False
        rank_pattern = {p: b for p, b in used.items() if b != r}
        alpha_pattern = {p: a for p, a in alphas.items() if a != alpha}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": peft_target_modules(model, set(used)),
        "lora_dropout": c.dropout,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": model.base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "revision": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(model: QDyLoRAModel, rank: Union[int, Allocation], out: Union[str, Path], *,
                overwrite: bool = False, layout: str = "patterns") -> Path:
    """Write `out/adapter_config.json` and `out/adapter_model.safetensors` for `rank` (an int, or
    an `Allocation` of per-layer ranks in the `layout` "patterns" or "padded").

    The directory is built next to `out` and renamed into place, so `out` is either absent or
    complete.
    """
    c = model.qdylora_config
    if layout not in LAYOUTS:
        raise QDyLoRAError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(rank, Allocation):
        if rank.max_rank == 0:
            raise QDyLoRAError(f"the allocation {rank} keeps no component: give it a larger budget")
        check_ranks([b for _, b in rank.ranks if b > 0], c.max_rank)
    else:
        check_ranks([rank], c.max_rank)
    out = Path(out)
    refuse_existing(out, overwrite, ours=PEFT_FILES.__contains__)
    fan_in_fan_out = uses_conv1d(model.model)
    config = peft_config(model, rank, fan_in_fan_out, layout)
    tensors = {}
    for path, layer in model.adapter_layers().items():
        b = layer_rank(rank, path)
        if b == 0:
            continue
        # (b, in) and (out, b): PEFT's nn.Linear shapes, also for Conv1D (fan_in_fan_out only
        # concerns the base weight's layout).
        A, B, s = layer.factors(b)
        A, B = A.cpu(), B.cpu()
        if layout == "padded":  # s(b) into B, zeros up to r: PEFT's scale is lora_alpha / r = 1
            r = config["r"]
            A = torch.cat([A, A.new_zeros(r - b, A.shape[1])])
            B = torch.cat([B * s, B.new_zeros(B.shape[0], r - b)], dim=1)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def export_run(run_dir: Union[str, Path], ranks: list[int], out: Union[str, Path], *, one: bool = False,
               overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
               allocation: Optional[AllocationRequest] = None, layout: str = "patterns",
               progress: bool = False) -> list[Path]:
    """Export ranks of a training run as PEFT LoRA folders: `out` itself when `one` rank is asked
    for, else out/rank-<b> for each; with `allocation` (ranks ignored), that allocation's per-layer
    ranks into `out` in `layout`. Ranks, layout and targets are checked before the model is loaded."""
    if layout not in LAYOUTS:
        raise QDyLoRAError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    targets = export_targets(out, ranks, one, allocation)

    def check_outputs(_) -> None:
        for target in targets:
            refuse_existing(target, overwrite, ours=PEFT_FILES.__contains__)

    run = open_run(run_dir, ranks, allocation, check_outputs, device=device, trust_remote_code=trust_remote_code,
                   progress=progress)
    for r, target in zip(run.entries, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        export_peft(run.model, r, target, overwrite=overwrite, layout=layout)
    return targets
