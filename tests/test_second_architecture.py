"""The whole pipeline on a second architecture: a tiny random Qwen2, which has what SmolLM2 (Llama)
lacks: biases on q/k/v and an output head not tied to the embeddings. prepare, train with every
rank rule, resume, sweep (loss, exact match, choice), PEFT export, merge and generate; the
numerical equalities (PEFT and merged logits, packed choice) are parametrized over it in
tests/export and tests/evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qdylora
from qdylora import QDyLoRAConfig
from qdylora.cli import main
from qdylora.data.batching import collate
from qdylora.data.rows import IGNORE, RowFormat, tokenize
from qdylora.training.losses import loss_sum
from qdylora.training.trainer import train

from .conftest import LOGIT_TOL, char_tokenizer, tiny_model, tiny_settings, transformers_4bit, write_sums

CHOICE_ROWS = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)],
                "gold": (a + b) % 3} for a in range(1, 6) for b in range(1, 4)]


@pytest.fixture(scope="module")
def qwen2_lm(tmp_path_factory):
    """A tiny random Qwen2 with the character tokenizer, loadable by path."""
    path = tmp_path_factory.mktemp("qwen2") / "qwen2"
    tiny_model("qwen2").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen2_run(qwen2_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_run")
    data = write_sums(root / "sums.jsonl", n=40)
    train(tiny_settings(qwen2_lm, data, max_steps=20), root / "run", progress=False)
    return root / "run", data


def test_qwen2_keeps_its_biases_and_untied_head_in_nf4(qwen2_lm):
    hf = tiny_model("qwen2")
    assert hf.model.layers[0].self_attn.q_proj.bias is not None  # what SmolLM2 lacks
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()
    model = qdylora.prepare(qwen2_lm, QDyLoRAConfig(max_rank=8, compute_dtype="float32"))
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = model.adapter_layers()[f"model.layers.0.self_attn.{name}"]
        torch.testing.assert_close(layer.base.bias, getattr(hf.model.layers[0].self_attn, name).bias)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 0):  # the base equals transformers' NF4 Qwen2, biases and all
        reference = transformers_4bit(qwen2_lm, torch.float32)(input_ids=x).logits
        torch.testing.assert_close(model.eval()(input_ids=x).logits, reference, **LOGIT_TOL["float32"])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_the_output_head_runs_on_supervised_positions_only(arch, tmp_path):
    """With a 151k vocabulary the head dominates the CPU cost: training projects only the positions
    whose next token carries a loss."""
    path = tmp_path / arch
    tiny_model(arch).save_pretrained(path)
    tok = char_tokenizer()
    model = qdylora.prepare(str(path), QDyLoRAConfig(max_rank=4, compute_dtype="float32"))
    rows = [{"question": "What is three plus four, in digits?", "answer": "7"},
            {"question": "Two plus two?", "answer": "4"}]
    examples, _ = tokenize(rows, tok, RowFormat("template", "{question}", "{answer}"))
    batch = collate(examples, tok.pad_token_id)
    seen = []
    model.model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    total, count = loss_sum(model, batch)
    supervised = int((batch["labels"][:, 1:] != IGNORE).any(0).sum())
    assert count > 0 and seen == [supervised] and supervised < batch["input_ids"].shape[1] - 1


@pytest.mark.parametrize("rule", ["full", "step", "example", "sandwich", "mixture"])
def test_every_rank_rule_trains_qwen2(rule, qwen2_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    summary = train(tiny_settings(qwen2_lm, data, max_steps=12, rank_rule=rule), tmp_path / "run", progress=False)
    for rank, after in summary["val_loss_after"].items():
        assert after < summary["val_loss_before"][rank] - 0.3, (rank, summary)


def test_resume_on_qwen2_gives_the_same_adapter(qwen2_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    settings = tiny_settings(qwen2_lm, data, max_steps=6, save_every=3)
    train(settings, tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(step):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(settings, tmp_path / "part", progress=False, on_step=stop_at_4)
    train(settings, tmp_path / "part", resume=True, progress=False)
    a, b = (load_file(tmp_path / run / "adapter.safetensors") for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_export_merge_and_generate_on_qwen2(qwen2_run, tmp_path, capsys):
    """The commands a user runs after training, on the Qwen2 run: every metric family of the sweep,
    a PEFT export PEFT loads, a merged model transformers loads, generation at two ranks."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run, data = qwen2_run
    assert main(["sweep", str(run), "--ranks", "1,8", "--metrics", "loss,exact_match", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "sweep"), "--quiet", "--exhaustive"]) == 0
    values = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["values"]
    assert values["loss"]["8"] < values["loss"]["0"] and set(values["exact_match"]) == {"0", "1", "8"}
    choice = tmp_path / "choice.jsonl"
    choice.write_text("".join(json.dumps(r) + "\n" for r in CHOICE_ROWS))
    assert main(["sweep", str(run), "--data", str(choice), "--ranks", "1,8", "--metrics", "choice",
                 "--out", str(tmp_path / "choice"), "--quiet", "--exhaustive"]) == 0
    values = json.loads((tmp_path / "choice" / "sweep.json").read_text())["values"]
    assert set(values["acc"]) == set(values["acc_norm"]) == {"0", "1", "8"}

    assert main(["export", str(run), "--rank", "4", "--out", str(tmp_path / "peft")]) == 0
    assert main(["merge", str(run), "--rank", "4", "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    model = qdylora.training.rundir.load_run(run)[0].eval()
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qdylora.at_rank(model, 4):
        ours = model(input_ids=x).logits
    with torch.no_grad(), qdylora.at_rank(model, 0):
        assert (model(input_ids=x).logits - ours).abs().max() > 1e-2  # the adapter is not a no-op
    base = transformers_4bit(json.loads((run / "config.json").read_text())["settings"]["model"], torch.float32)
    with torch.no_grad():  # PEFT on transformers' NF4 base, and the merged plain model, reproduce rank 4
        via_peft = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(input_ids=x).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=x).logits
    torch.testing.assert_close(via_peft, ours, **LOGIT_TOL["float32"])
    torch.testing.assert_close(merged, ours, **LOGIT_TOL["float32"])
    capsys.readouterr()
    assert main(["generate", str(run), "--rank", "1,8", "--prompt", "3+4=", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "[rank 1]" in printed and "[rank 8]" in printed
