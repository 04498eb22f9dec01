"""Tiny random checkpoints (written once per session) for fast tests."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 128

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=16,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64,
    ),
    "falcon": lambda: FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
}

# Adapted layers per transformer block with target_modules="all-linear".
LINEARS_PER_BLOCK = {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4, "opt": 6, "falcon": 4}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model in float32. Weights are scaled up from HF's std 0.02 so that the
    adapters and the quantization visibly change the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "emb" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """arch -> directory of a saved tiny random checkpoint (safetensors)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = root / arch
            tiny_model(arch).save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return get


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def char_tokenizer():
    """A character-level tokenizer (printable ASCII and newline) with <s>, </s>, <pad>, <unk>
    and a chat template: small enough for the tiny models' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """Directory of a tiny random Llama with the character tokenizer: a model `qdylora train`
    can load by path."""
    path = tmp_path_factory.mktemp("tiny_lm") / "llama"
    tiny_model("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)
