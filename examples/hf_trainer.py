"""QDyLoRA with a plain Hugging Face `Trainer`: one rank per optimizer step drawn by
`qdylora.QDyLoRACallback` (the QDyLoRA paper's rule), validation loss at ranks 1, 8 and 64.

    .venv/bin/python examples/hf_trainer.py --out runs/hf --steps 30
    .venv/bin/qdylora sweep runs/hf --ranks 1,8,64 --max-examples 50
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

import qdylora
from qdylora.data.embedded import smollm2_checkpoint
from qdylora.data.rows import RowFormat, tokenize

ASDIV = qdylora.DataSettings(data="asdiv:train", format="template", prompt_template="{passage} {question}",
                             response_template="{answer}", chat_template=True)


def as_dataset(rows, tokenizer) -> Dataset:
    """input_ids / labels (loss on the answer) / attention_mask, rendered by the chat template
    with qdylora's tokenizer (the same examples `qdylora train` makes)."""
    fmt = RowFormat(ASDIV.format, ASDIV.prompt_template, ASDIV.response_template, ASDIV.chat_template)
    examples, _ = tokenize(rows, tokenizer, fmt)
    return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)}
                              for e in examples])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hf")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = qdylora.prepare(path, qdylora.QDyLoRAConfig(max_rank=64, alpha=16))
    model.print_trainable_parameters()
    train_rows, val_rows = qdylora.read_rows("asdiv:train"), qdylora.read_rows("asdiv:validation")[:32]

    config = TrainingArguments(
        output_dir=f"{args.out}-trainer", max_steps=args.steps, per_device_train_batch_size=8,
        learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=min(5, args.steps), logging_steps=5,
        eval_strategy="steps", eval_steps=args.steps, save_strategy="no", report_to=[],
        bf16=model.qdylora_config.compute_dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
    )
    callback = qdylora.QDyLoRACallback(model, rank_rule="step", order="none", eval_ranks=[1, 8, 64])
    trainer = Trainer(model=model, args=config, train_dataset=as_dataset(train_rows, tokenizer),
                      eval_dataset=as_dataset(val_rows, tokenizer), callbacks=[callback],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    trainer.train()
    print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("eval_loss")})
    model.save_pretrained(args.out, data=ASDIV)
    print(f"saved {args.out}: qdylora sweep {args.out} --ranks 1,8,64")


if __name__ == "__main__":
    main()
