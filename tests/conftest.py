"""Tiny random checkpoints (written once per session) for fast tests."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from typing import Optional
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from qdylora.core.config import QDyLoRAConfig
from qdylora.core.devices import CPU_BF16_ENV, fast_compute_dtype
from qdylora.training.settings import DataSettings, RunSettings, TrainSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# What compute_dtype "auto" resolves to on a CPU, for the whole run and the processes the tests
# start: `pytest --auto-dtype bfloat16` (as on a CPU with AVX512-BF16 or AMX) or `--auto-dtype
# float32` (as on an AVX2-only CPU) sets the probe override QDYLORA_CPU_BF16; the default keeps
# whatever the environment says (normally nothing: the CPU's own probe).
def pytest_addoption(parser):
    parser.addoption("--auto-dtype", choices=("probe", "bfloat16", "float32"), default="probe",
                     help="what compute_dtype 'auto' resolves to on the CPU during the tests")
    parser.addoption("--cuda-device", default="cuda",
                     help="device of the tests marked cuda (cpu: run them here, to check the tests themselves)")


def pytest_configure(config):
    choice = config.getoption("--auto-dtype")
    if choice != "probe":
        os.environ[CPU_BF16_ENV] = "1" if choice == "bfloat16" else "0"


def pytest_report_header(config):
    return f"compute_dtype 'auto' on this CPU resolves to {fast_compute_dtype('cpu')}"


VOCAB = 128

# Compute dtypes the dtype-sensitive tests run in on every machine (bf16 is emulated, slow but
# correct, on AVX2-only CPUs), and how far logits of two computations of the same model may be
# apart in each: float32 rounding, or bf16 rounding (8 significant bits) through a tiny model's
# layers (measured: up to 0.04 on logits of magnitude 2.8, tiny Llama, PEFT and merge).
COMPUTE_DTYPES = ("float32", "bfloat16")
LOGIT_TOL = {"float32": dict(rtol=1e-4, atol=1e-4), "bfloat16": dict(rtol=3e-2, atol=6e-2)}

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


def gguf_writer(hf: torch.nn.Module, path):
    """A gguf.GGUFWriter for the transformers model `hf` at `path`, holding the hyperparameters
    transformers' GGUF reader needs and a token list; the caller adds tensors and writes it."""
    import gguf

    from qdylora.core.gguf_base import gguf_architecture

    c = hf.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf_architecture(hf)])
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    return w


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


def write_sums(path, n=48, seed=0):
    """A JSONL file of one-digit sums: {"question": "3+4=", "answer": "7"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"{a}+{b}=", "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_settings(model, data, compute_dtype="float32", **train) -> RunSettings:
    """Settings of a short run on `data` (sums) with the tiny model at max_rank 8 (float32
    unless `compute_dtype` says otherwise)."""
    defaults = dict(max_steps=6, micro_batch_size=4, grad_accumulation=2, lr=1e-2,
                    eval_every=0, save_every=0)
    return RunSettings(
        model=model,
        adapter=QDyLoRAConfig(max_rank=8, alpha=16, dropout=0.1, compute_dtype=compute_dtype),
        data=DataSettings(data=data, prompt_template="{question}", response_template="{answer}",
                          val_fraction=0.25),
        train=TrainSettings(**{**defaults, **train}),
    )


@pytest.fixture(scope="session")
def trained_run(tiny_lm, tmp_path_factory):
    """A finished 20-step run of the tiny Llama on sums (max_rank 8), shared by the tests that
    read runs (sweep, export, merge, generate). Tests must not write into it."""
    from qdylora.training.trainer import train

    root = tmp_path_factory.mktemp("trained")
    data = write_sums(root / "sums.jsonl", n=40)
    run = root / "run"
    train(tiny_settings(tiny_lm, data, max_steps=20), run, progress=False)
    return run


def adapted_model(path, scaling="standard", compute_dtype="float32"):
    """A prepared tiny model (max_rank 8, no dropout) whose B is random, so every rank differs
    from the base; in eval mode."""
    import qdylora

    model = qdylora.prepare(path, QDyLoRAConfig(max_rank=8, alpha=16, scaling=scaling, dropout=0.0,
                                                compute_dtype=compute_dtype))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return model.eval()


def transformers_4bit(path, dtype: torch.dtype, frozen_dtype: Optional[torch.dtype] = None):
    """The reference QLoRA base: transformers + BitsAndBytesConfig(nf4, double quant), with
    bitsandbytes' AVX512-BF16 CPU repacking turned off as in our layers, so both run the same
    kernels (the repacked eval path computes with bf16 block scales: 0.03 apart on an
    AVX512-BF16 CPU even in float32)."""
    from qdylora.core.loading import bnb_config
    from qdylora.core.quantize import guard_cpu_repacking
    import bitsandbytes as bnb

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(dtype),
                                                 dtype=frozen_dtype or dtype)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            guard_cpu_repacking(m)
    return model.eval()
