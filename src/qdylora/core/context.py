"""How many positions a model reads, and lengths cut to fit them.

A model with learned absolute positions (GPT-2, OPT) fails with an IndexError in the middle of
a run when a row is longer than its position table; rotary models degrade past their trained
length. So lengths are capped at the model's maximum positions, and the cap is said once.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..console import log

# config attributes that hold the number of positions, by family (Llama: max_position_embeddings,
# GPT-2: n_positions, Bloom-like: seq_length, MPT: max_seq_len)
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def context_length(model: nn.Module) -> Optional[int]:
    """The most positions `model` reads, from its config (None if it does not say)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_lengths(source: int, target: int, context: Optional[int]) -> tuple[int, int]:
    """(prompt tokens, response tokens) kept of (source, target) so that both fit in `context`
    positions: unchanged when they fit; else the response keeps at most half and the prompt the
    rest (a note says so)."""
    if context is None or source + target <= context:
        return source, target
    new_target = min(target, max(1, context // 2))
    new_source = max(1, context - new_target)
    log.info(f"the model reads at most {context} positions: prompts are cut at {new_source} tokens and "
             f"responses at {new_target} (asked: {source} + {target})")
    return new_source, new_target


def fit_generation(prompt_tokens: int, max_new_tokens: int, context: Optional[int]) -> tuple[int, int]:
    """(prompt tokens kept: the last ones, new tokens) that fit in `context` positions: new tokens
    keep at most half of the context when both do not fit (a note says so)."""
    if context is None or prompt_tokens + max_new_tokens <= context:
        return prompt_tokens, max_new_tokens
    new = min(max_new_tokens, max(1, context // 2))
    kept = min(prompt_tokens, context - new)
    log.info(f"the model reads at most {context} positions: the prompt keeps its last {kept} of {prompt_tokens} "
             f"tokens and the answer at most {new} new tokens (asked: {max_new_tokens})")
    return kept, new
