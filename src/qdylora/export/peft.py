"""Export one rank of a QDyLoRA adapter as a standard PEFT LoRA adapter.

At rank b the adapter is s(b) * B[:, :b] A[:b]; PEFT's LoRA at r = b computes
lora_alpha / r * lora_B lora_A (or lora_alpha / sqrt(r) with use_rslora), so r = b,
lora_alpha = alpha and use_rslora = (scaling == "rslora") give exactly our scale; for the
"nested" rule (s(b) = alpha / sqrt(R) at every b) lora_alpha = s * b without rslora.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from safetensors.torch import save_file

from ..core.model import QDyLoRAModel, prepare
from ..core.scaling import scale
from ..core.targets import uses_conv1d
from ..files import atomic_dir, refuse_existing
from ..training.adapter_file import load_adapter
from ..training.rundir import load_run_settings
from ..training.sampling import check_ranks

PEFT_PREFIX = "base_model.model."


def peft_target_modules(model: QDyLoRAModel) -> Union[list[str], str]:
    """PEFT's target_modules for exactly our adapted layers: their leaf names when those select
    no other module (what vLLM and most tools expect), else an anchored regex of the paths."""
    adapted = set(model.adapter_layers())
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    selected = {name for name, _ in model.model.named_modules()
                if name and name.rsplit(".", 1)[-1] in leaves and ".base" not in name
                and not name.endswith((".lora_A", ".lora_B", ".dropout"))}
    if selected == adapted:
        return leaves
    return "^(?:" + "|".join(re.escape(p) for p in sorted(adapted)) + ")$"


# What an export writes (and all that --overwrite may replace).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_config(model: QDyLoRAModel, rank: int, fan_in_fan_out: bool) -> dict:
    """adapter_config.json for rank `rank` (PEFT 0.x LoRA fields)."""
    c = model.qdylora_config
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale(c.alpha, rank, c.scaling, c.max_rank) * rank if c.scaling == "nested" else c.alpha,
        "use_rslora": c.scaling == "rslora",
        "target_modules": peft_target_modules(model),
        "lora_dropout": c.dropout,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "base_model_name_or_path": model.base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(model: QDyLoRAModel, rank: int, out: Union[str, Path], *, overwrite: bool = False) -> Path:
    """Write `out/adapter_config.json` and `out/adapter_model.safetensors` for `rank`.

    The directory is built next to `out` and renamed into place, so `out` is either absent or
    complete.
    """
    check_ranks([rank], model.qdylora_config.max_rank)
    out = Path(out)
    refuse_existing(out, overwrite, ours=PEFT_FILES.__contains__)
    fan_in_fan_out = uses_conv1d(model.model)
    tensors = {}
    for path, layer in model.adapter_layers().items():
        # (b, in) and (out, b): PEFT's nn.Linear shapes, also for Conv1D (fan_in_fan_out only
        # concerns the base weight's layout).
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = layer.lora_A.detach()[:rank].cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = layer.lora_B.detach()[:, :rank].cpu().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(model, rank, fan_in_fan_out), indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def export_run(run_dir: Union[str, Path], ranks: list[int], out: Union[str, Path], *, one: bool = False,
               overwrite: bool = False, device: Optional[str] = None,
               trust_remote_code: bool = False) -> list[Path]:
    """Export ranks of a training run as PEFT LoRA folders: `out` itself when `one` rank is asked
    for, else out/rank-<b> for each. Ranks and targets are checked before the model is loaded."""
    settings, adapter = load_run_settings(run_dir, trust_remote_code)
    check_ranks(ranks, settings.adapter.max_rank)
    out = Path(out)
    targets = [out] if one else [out / f"rank-{r}" for r in ranks]
    for target in targets:
        refuse_existing(target, overwrite, ours=PEFT_FILES.__contains__)
    model = prepare(settings.model, settings.adapter, device=device or settings.device,
                    trust_remote_code=settings.trust_remote_code)
    load_adapter(model, adapter)
    for r, target in zip(ranks, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        export_peft(model, r, target, overwrite=overwrite)
    return targets
