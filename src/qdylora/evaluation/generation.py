"""Greedy generation at several ranks in one batch (per-example ranks)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from ..core.context import context_length, fit_generation
from ..core.rank import replicate_for_ranks
from ..data.batching import pad_token_id
from ..data.rows import prompt_ids


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (n, longest), padded on the left for generation."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids, mask


def stop_ids(tokenizer, model: nn.Module) -> list[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation EOS."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


@contextlib.contextmanager
def contiguous_head_input(hf: nn.Module) -> Iterator[None]:
    """Within the block, the output head gets its input contiguous.

    At the prefill, transformers slices the last position, hidden[:, -1:, :] of (n, T, d), and
    hands that strided view to the head. torch 2.13's CPU `linear` in bfloat16 with a weight that
    needs no gradient takes a slow path for it: Qwen2.5-0.5B's 151,936 x 896 head on 24 rows took
    31.7 s strided against 0.05 s contiguous (2-core Xeon with AMX, 2026-12-07), 93 % of a sweep's
    exact-match time. A copy of n x d values costs nothing next to it."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: tuple(
        a.contiguous() if isinstance(a, torch.Tensor) else a for a in args))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_at_ranks(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    ranks: Sequence[int],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    rank_batch: int = 0,
    device: Optional[torch.device] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict[int, list[str]]:
    """{rank: [generated text per prompt]}, greedy, stopping at EOS.

    Each batch of prompts is replicated once per rank (up to `rank_batch` ranks at a time; 0 =
    all) with per-example ranks, so all ranks decode together; rank_batch=1 runs the ranks one
    after another at a shared rank.
    """
    hf = getattr(model, "model", model)
    device = device or next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    kept, max_new_tokens = fit_generation(max(map(len, prompts), default=0), max_new_tokens, context_length(model))
    prompts = [p[len(p) - min(len(p), kept):] for p in prompts]  # the last `kept` tokens of each
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=stop_ids(tokenizer, hf))
    group = rank_batch if rank_batch > 0 else len(ranks)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    out: dict[int, list[str]] = {r: [""] * len(prompts) for r in ranks}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)  # (n, T)
        ids, mask, n = ids.to(device), mask.to(device), len(idx)
        for r0 in range(0, len(ranks), group):
            chunk = list(ranks[r0:r0 + group])
            x, m = replicate_for_ranks(model, chunk, ids, mask)  # (k*n, T), rank-major
            with contiguous_head_input(hf):
                generated = hf.generate(input_ids=x, attention_mask=m, generation_config=config)
            texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
            for j, r in enumerate(chunk):
                for k, i in enumerate(idx):
                    out[r][i] = texts[j * n + k]
            if on_batch is not None:
                on_batch(len(chunk))
    return out


def chat_prompt_ids(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """The prompt as token ids, wrapped in the tokenizer's chat template when it has one."""
    chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    return prompt_ids(tokenizer, [{"role": "user", "content": prompt}], chat=chat)


@torch.no_grad()
def answer(
    model: nn.Module,
    tokenizer,
    prompt: str,
    ranks: Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    use_chat_template: bool = True,
    stream=None,
) -> dict[int, str]:
    """Answer one prompt at each rank in `ranks` (0 = the base model), all in one batch.

    With one rank and a `stream` (a text file such as sys.stdout), tokens are written as they
    are produced. temperature 0 is greedy decoding; `seed` makes sampling repeatable.
    """
    from transformers import TextStreamer

    hf = getattr(model, "model", model)
    device = next(model.parameters()).device
    ids = chat_prompt_ids(tokenizer, prompt, use_chat_template)
    kept, max_new_tokens = fit_generation(len(ids), max_new_tokens, context_length(model))
    ids = torch.tensor([ids[len(ids) - kept:]], device=device)  # (1, T): the prompt's last tokens that fit
    pad_id = pad_token_id(tokenizer)
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad_id,
                              eos_token_id=stop_ids(tokenizer, hf),
                              **({"temperature": temperature, "top_p": top_p} if sample else {}))
    ranks = list(ranks)
    (x,) = replicate_for_ranks(model, ranks, ids)  # (k, T): one row per rank
    streamer = None
    if stream is not None and len(ranks) == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(seed)
    with contiguous_head_input(hf):
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config,
                          streamer=streamer)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return dict(zip(ranks, texts))
