"""Load a run's exported PEFT adapter with PEFT itself and compare logits with qdylora.

    .venv/bin/python benchmarks/peft_check.py RUN_DIR PEFT_DIR BASE_CHECKPOINT [--prompts 8]

PEFT_DIR comes from `qdylora export RUN_DIR --rank b --out PEFT_DIR`; BASE_CHECKPOINT is the
base model as a safetensors directory (for the embedded SmolLM2: the cache conversion). Prints
the max |logit| difference between qdylora at rank b and PEFT on the base loaded in 4-bit with
bitsandbytes (same NF4 quantization), and on the base in full precision (which also contains the
NF4 rounding of the base, so it is larger).
"""

from __future__ import annotations

import argparse
import json

import bitsandbytes as bnb
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import qdylora
from qdylora.core.loading import bnb_config
from qdylora.core.quantize import guard_cpu_repacking
from qdylora.data.batching import pad_token_id
from qdylora.data.rows import generation_prompts, read_rows, row_format
from qdylora.evaluation.generation import left_pad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("peft_dir")
    ap.add_argument("base")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    rank = json.load(open(f"{args.peft_dir}/adapter_config.json"))["r"]
    model, tok, s = qdylora.load_run(args.run)
    model.eval()
    rows = read_rows(s.data.val_data or s.data.data)[: args.prompts]
    prompts, _ = generation_prompts(rows, tok, row_format(s.data, rows[0].keys(), "data"))
    ids, mask = left_pad(prompts, pad_token_id(tok))
    dtype = model.qdylora_config.torch_compute_dtype
    with torch.no_grad():
        with qdylora.at_rank(model, rank):
            ours = model(input_ids=ids, attention_mask=mask).logits.float()
        with qdylora.at_rank(model, 0):
            base_ours = model(input_ids=ids, attention_mask=mask).logits.float()
        keep = mask.bool()
        out = {"rank": rank, "compute_dtype": str(dtype), "prompts": len(prompts), "tokens": int(keep.sum()),
               "adapter_effect_max_abs": float((ours - base_ours)[keep].abs().max())}
        b4 = AutoModelForCausalLM.from_pretrained(args.base, quantization_config=bnb_config(dtype), dtype=dtype)
        for m in b4.modules():  # the same kernels as ours: bitsandbytes' AVX512-BF16 CPU eval
            if isinstance(m, bnb.nn.Linear4bit):  # path repacks with bf16 block scales
                guard_cpu_repacking(m)
        p4 = PeftModel.from_pretrained(b4, args.peft_dir).eval()
        l4 = p4(input_ids=ids, attention_mask=mask).logits.float()
        out["peft_4bit_max_abs_diff"] = float((l4 - ours)[keep].abs().max())
        del p4, b4
        bf = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
        pf = PeftModel.from_pretrained(bf, args.peft_dir).eval()
        lf = pf(input_ids=ids, attention_mask=mask).logits.float()
        out["peft_full_precision_max_abs_diff"] = float((lf - ours)[keep].abs().max())
        out["max_abs_logit"] = float(ours[keep].abs().max())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
