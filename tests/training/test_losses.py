"""Token losses: only the needed positions reach the output head, with the same result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qdylora
from qdylora import QDyLoRAConfig
from qdylora.data.rows import IGNORE
from qdylora.training.losses import loss_sum, row_loss_sums

from ..conftest import COMPUTE_DTYPES, VOCAB


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 8:12] = ids[0, 8:12]  # responses at different places, as with masked prompts
    labels[1, 4:7] = ids[1, 4:7]
    labels[2, 9:10] = ids[2, 9:10]
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference(model, b):
    """Full logits for every position, cross-entropy in float64."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=IGNORE, reduction="none")
    return ce.sum(1), (b["labels"][:, 1:] != IGNORE).sum(1)


# Both sides run the same model in the same dtype; only the set of positions projected onto the
# vocabulary differs, which changes bf16 matmul blocking: summed losses within bf16 rounding.
LOSS_TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "falcon"])
def test_loss_on_kept_positions_equals_full_logits(arch, dtype, tiny_dir):
    model = qdylora.prepare(tiny_dir(arch), QDyLoRAConfig(max_rank=4, compute_dtype=dtype, dropout=0.0))
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.normal_(0, 0.1)  # not a no-op adapter
    model.eval()
    b = batch()
    with torch.no_grad():
        ref_rows, ref_counts = reference(model, b)
        total, count = loss_sum(model, b)
        rows, counts = row_loss_sums(model, b)
    assert count == int(ref_counts.sum()) == 8
    torch.testing.assert_close(total.double(), ref_rows.sum(), **LOSS_TOL[dtype])
    torch.testing.assert_close(rows.double(), ref_rows, **LOSS_TOL[dtype])
    assert counts.tolist() == ref_counts.tolist()
