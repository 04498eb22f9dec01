"""QDyLoRA with TRL's SFTTrainer: the embedded SmolLM2-135M-Instruct fine-tuned on ASDiv through
`qdylora.QDyLoRACallback`, saved as a run directory that `qdylora sweep` and `qdylora export` read.

    .venv/bin/python examples/sft_trainer.py --out runs/sft --steps 30
    .venv/bin/qdylora sweep runs/sft --ranks 1,8,64 --max-examples 50
    .venv/bin/qdylora export runs/sft --rank 8 --out runs/sft-rank-8

Needs `pip install trl`. On a GPU, pass --optim paged_adamw_8bit (QLoRA's optimizer) if you like.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

import qdylora
from qdylora.data.embedded import smollm2_checkpoint

# How the rows were formatted, saved with the run so `qdylora sweep` formats test rows alike.
ASDIV = qdylora.DataSettings(data="asdiv:train", format="template", prompt_template="{passage} {question}",
                             response_template="{answer}", chat_template=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sft")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--optim", default="adamw_torch")
    args = ap.parse_args()

    path = smollm2_checkpoint()  # or any hub id / model directory
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=args.max_rank, alpha=16))
    model.print_trainable_parameters()

    # conversational prompt / completion rows: TRL applies the chat template, loss on the answer
    rows = qdylora.read_rows("asdiv:train")
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"{r['passage']} {r['question']}"}],
         "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])

    config = SFTConfig(
        output_dir=f"{args.out}-trainer", max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=min(5, args.steps), logging_steps=5,
        optim=args.optim, save_strategy="no", report_to=[], max_length=512,
        bf16=model.qdylora_config.compute_dtype == "bfloat16",  # float32 where bf16 is only emulated
        use_cpu=not torch.cuda.is_available(),
    )
    # rank_rule "full" + SVD order: qdylora train's default recipe (docs/rank-study.md);
    # rank_rule="step" draws one rank per optimizer step, as the QDyLoRA paper does
    callback = qdylora.QDyLoRACallback(model, rank_rule="full")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[callback])
    trainer.train()
    model.save_pretrained(args.out, data=ASDIV)
    print(f"saved {args.out}: qdylora sweep {args.out} --ranks 1,8,64")


if __name__ == "__main__":
    main()
