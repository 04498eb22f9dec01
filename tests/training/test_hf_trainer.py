"""QDyLoRA inside transformers' Trainer and TRL's SFTTrainer: the callback draws the ranks
`qdylora train` draws, only A and B train, and the result sweeps and exports with our commands."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PretrainedConfig, Trainer, TrainingArguments

import qdylora
from qdylora import QDyLoRACallback, QDyLoRAConfig, QDyLoRAError
from qdylora.cli import main
from qdylora.training.trainer import train

from ..conftest import tiny_settings, write_sums

CONFIG = QDyLoRAConfig(max_rank=8, alpha=16, dropout=0.0, compute_dtype="float32")


def tokenized(tok, rows):
    """input_ids / labels (loss on the answer only) / attention_mask, as the Trainer takes them."""
    def encode(row):
        prompt, answer = tok(row["question"])["input_ids"], tok(row["answer"])["input_ids"] + [tok.eos_token_id]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                "attention_mask": [1] * (len(prompt) + len(answer))}

    return Dataset.from_list(rows).map(encode, remove_columns=["question", "answer"])


def frozen_base(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_the_model_passes_for_the_transformers_model_it_wraps(tiny_lm, capsys):
    model = qdylora.prepare(tiny_lm, CONFIG)
    assert isinstance(model.config, PretrainedConfig) and model.config is model.model.config
    assert model.qdylora_config.max_rank == 8
    assert model.get_input_embeddings() is model.model.get_input_embeddings()
    assert model.generation_config is model.model.generation_config and model.device.type == "cpu"
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.adapter_parameters())
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert list(inspect.signature(model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    twin = copy.deepcopy(model)  # the copy's forward runs the copy's modules
    assert twin.forward.__self__ is twin and twin.get_input_embeddings() is not model.get_input_embeddings()
    with pytest.raises(QDyLoRAError, match="cannot run inside a Trainer"):
        QDyLoRACallback(model, rank_rule="example")


def test_a_trainer_run_draws_the_ranks_qdylora_train_draws(tiny_lm, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    data = write_sums(tmp_path / "sums.jsonl")
    ours = tmp_path / "ours"
    train(tiny_settings(tiny_lm, data, max_steps=6, rank_rule="step", grad_accumulation=1), ours, progress=False)
    expected = [json.loads(x)["rank"] for x in (ours / "metrics.jsonl").read_text().splitlines() if '"rank"' in x]

    model = qdylora.prepare(tiny_lm, CONFIG)
    base, adapters = frozen_base(model), {k: v.clone() for k, v in model.adapter_state_dict().items()}
    callback = QDyLoRACallback(model, rank_rule="step", order="none", eval_ranks=[1, 8])
    rows = [json.loads(x) for x in open(data).read().splitlines()]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                             save_strategy="no", eval_strategy="steps", eval_steps=6, use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=tokenized(tok, rows[:40]),
                      eval_dataset=tokenized(tok, rows[40:]),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), callbacks=[callback])
    trainer.train()
    assert [callback.drawn[s] for s in range(6)] == expected  # the same sampler, the same seed
    logged = [h["rank"] for h in trainer.state.log_history if "loss" in h and "rank" in h]
    assert logged == expected
    evaluated = [h for h in trainer.state.log_history if "eval_loss_rank_8" in h]
    assert evaluated and evaluated[-1]["eval_loss_rank_1"] != evaluated[-1]["eval_loss_rank_8"]
    after = model.adapter_state_dict()
    assert any(not torch.equal(adapters[k], after[k]) for k in adapters)  # the adapters trained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # nothing else did


def test_an_sft_trainer_run_sweeps_and_exports_with_our_commands(tiny_lm, tmp_path, capsys):
    trl = pytest.importorskip("trl")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    data = write_sums(tmp_path / "sums.jsonl")
    rows = [json.loads(x) for x in open(data).read().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["question"], "completion": r["answer"]} for r in rows])
    model = qdylora.prepare(tiny_lm, CONFIG)
    adapters = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         bf16=False, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             callbacks=[QDyLoRACallback(model)])
    trainer.train()
    after = model.adapter_state_dict()
    assert any(not torch.equal(adapters[k], after[k]) for k in adapters)
    assert model.qdylora_config.scaling == "nested"  # SVD-ordered at the end, as qdylora train saves
    run = tmp_path / "run"
    model.save_pretrained(run, data=tiny_settings(tiny_lm, data).data)
    assert main(["sweep", str(run), "--data", data, "--ranks", "1,8", "--metrics", "loss", "--quiet"]) == 0
    assert "recommended rank by loss" in capsys.readouterr().out
    assert main(["export", str(run), "--rank", "2", "--out", str(tmp_path / "peft")]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 2
    with pytest.raises(QDyLoRAError, match="is not empty"):
        model.save_pretrained(tmp_path / "peft")
