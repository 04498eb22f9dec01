"""The training loop on a tiny Llama: it learns, it samples ranks, it resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qdylora.errors import QDyLoRAError
from qdylora.training.rundir import checkpoint_dirs
from qdylora.training.trainer import train

from ..conftest import tiny_settings as settings
from ..conftest import COMPUTE_DTYPES, write_sums


class Stop(Exception):
    pass


def lines(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def stopped_at_4_then_resumed(run_settings, run) -> None:
    """Train into `run`, crash after step 4, then resume to the end."""
    def stop_at_4(step):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train(run_settings, run, progress=False, on_step=stop_at_4)
    train(run_settings, run, resume=True, progress=False)


def test_training_lowers_validation_loss_at_every_measured_rank(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    summary = train(settings(tiny_lm, data, max_steps=30, eval_every=15, rank_rule="step"), run, progress=False)
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    assert sorted(after, key=int) == ["1", "2", "8"]  # smallest, middle power of two, largest
    assert len(set(before.values())) == 1  # B = 0: every rank is the base model
    for rank in after:
        assert after[rank] < before[rank] - 0.5, (rank, before, after)
    assert {p.name for p in run.iterdir()} >= {"config.json", "data_stats.json", "adapter.safetensors",
                                               "metrics.jsonl", "summary.json", "checkpoints"}
    tensors = load_file(run / "adapter.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (8, 64)
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_B"))
    steps = [x for x in lines(run) if "rank" in x]
    assert [x["step"] for x in steps] == list(range(1, 31))
    assert all(1 <= x["rank"] <= 8 for x in steps) and len({x["rank"] for x in steps}) > 3
    assert [x["step"] for x in lines(run) if "val_loss" in x] == [0, 15, 30]


def test_training_in_bfloat16_learns(tiny_lm, tmp_path):
    """The bf16 path (autocast, bf16 NF4 matmuls, float32 A and B) trains as float32 does."""
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    summary = train(settings(tiny_lm, data, compute_dtype="bfloat16", max_steps=30), run, progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["adapter"]["compute_dtype"] == "bfloat16"
    assert load_file(run / "adapter.safetensors")["model.layers.0.self_attn.q_proj.lora_A"].dtype == torch.float32
    for rank, after in summary["val_loss_after"].items():
        assert after < summary["val_loss_before"][rank] - 0.5, (rank, summary)


def test_min_rank_equal_to_max_rank_is_plain_qlora(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    train(settings(tiny_lm, data, min_rank=8), run, progress=False)
    assert {x["rank"] for x in lines(run) if "rank" in x} == {8}


def test_explicit_ranks_are_the_only_ones_sampled(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    train(settings(tiny_lm, data, max_steps=12, ranks="2,8", rank_weights="1,3", rank_rule="step"), run,
          progress=False)
    assert {x["rank"] for x in lines(run) if "rank" in x} == {2, 8}  # seed 0 draws both


@pytest.mark.parametrize("rule", ["example", "sandwich", "mixture"])
def test_every_rank_rule_trains_every_measured_rank(rule, tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    summary = train(settings(tiny_lm, data, max_steps=20, rank_rule=rule), run, progress=False)
    for rank, after in summary["val_loss_after"].items():
        assert after < summary["val_loss_before"][rank] - 0.5, (rank, summary)
    logged = [x["rank"] for x in lines(run) if "loss" in x]
    assert len(logged) == 20
    if rule == "mixture":
        assert set(logged) == {"mixture"}
    else:  # every row's rank: both ends in every step, 3 ranks per example for sandwich
        assert all(len(r) == 8 * (3 if rule == "sandwich" else 1) and {1, 8} <= set(r) for r in logged)


def test_resume_is_exact_with_per_example_ranks(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=6, save_every=3, rank_rule="example")
    train(settings(tiny_lm, data, **opts), tmp_path / "full", progress=False)
    stopped_at_4_then_resumed(settings(tiny_lm, data, **opts), tmp_path / "part")
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_rank_training_with_svd_order_saves_every_rank_as_the_best_cut(tiny_lm, tmp_path):
    """--rank-rule full --order svd: checkpoints hold the trained factors (alpha / b), the run's
    adapter is their SVD ordering (nested); the full delta is the same, each rank b is the best
    rank-b approximation of it, the run loads and sweeps as any other, and resume is exact."""
    from qdylora.core.ordering import order_by_svd
    from qdylora.training.adapter_file import read_adapter_metadata
    from qdylora.training.rundir import load_run
    from ..conftest import adapted_model

    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=6, save_every=3, rank_rule="full", order="svd", eval_ranks="1,8")
    summary = train(settings(tiny_lm, data, **opts), tmp_path / "full", progress=False)
    run = tmp_path / "full"
    assert {x["rank"] for x in lines(run) if "loss" in x} == {8}
    last = checkpoint_dirs(run)[-1] / "adapter.safetensors"
    assert read_adapter_metadata(last)["config"].scaling == "standard"
    assert read_adapter_metadata(run / "adapter.safetensors")["config"].scaling == "nested"

    trained = adapted_model(tiny_lm, scaling="standard")  # the checkpoint's factors, ordered here
    trained.load_adapter_state_dict(load_file(last))
    order_by_svd(trained)
    saved = load_file(run / "adapter.safetensors")
    for name, tensor in trained.adapter_state_dict().items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6)

    model, _, loaded = load_run(run)  # prepared with the file's scale rule
    assert loaded.adapter.scaling == "nested" and model.qdylora_config.scaling == "nested"
    # a model passed in is left as the run saved it (what a notebook or the demo goes on with)
    passed = adapted_model(tiny_lm, scaling="standard")
    train(settings(tiny_lm, data, **opts), tmp_path / "passed", progress=False, model=passed)
    assert passed.qdylora_config.scaling == "nested"
    passed_saved = load_file(tmp_path / "passed" / "adapter.safetensors")
    for name, tensor in passed.adapter_state_dict().items():
        torch.testing.assert_close(tensor, passed_saved[name], rtol=0, atol=1e-6)
    for rank in ("1", "8"):  # validation ran on the ordered adapter and training helped it
        assert summary["val_loss_after"][rank] < summary["val_loss_before"][rank] - 0.3, summary
    stopped_at_4_then_resumed(settings(tiny_lm, data, **opts), tmp_path / "part")
    resumed = load_file(tmp_path / "part" / "adapter.safetensors")
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_checkpoints_keep_the_last_k(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    train(settings(tiny_lm, data, save_every=1, keep_last=2), run, progress=False)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-000005", "step-000006"]
    assert not list((run / "checkpoints").glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("dtype", COMPUTE_DTYPES)
def test_resume_finishes_with_the_same_adapter(dtype, tiny_lm, tmp_path):
    """A run stopped after step 4 and resumed ends bit-equal to an uninterrupted run, with
    dropout, gradient accumulation, warmup and a cosine schedule in play, in each compute dtype
    (bfloat16: autocast on, float32 adapter masters)."""
    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=8, save_every=2, warmup_steps=2, schedule="cosine", eval_every=3,
                compute_dtype=dtype)
    full, part = tmp_path / "full", tmp_path / "part"
    train(settings(tiny_lm, data, **opts), full, progress=False)

    def stop_at_5(step):
        if step == 5:  # after step 5, whose checkpoint was not due: resume goes back to step 4
            raise Stop

    with pytest.raises(Stop):
        train(settings(tiny_lm, data, **opts), part, progress=False, on_step=stop_at_5)
    assert [p.name for p in checkpoint_dirs(part)] == ["step-000002", "step-000004"]
    summary = train(settings(tiny_lm, data, **opts), part, resume=True, progress=False)
    assert summary["steps"] == 8
    a, b = load_file(full / "adapter.safetensors"), load_file(part / "adapter.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "elapsed")} for r in rows]  # noqa: E731
    assert strip(lines(part)) == strip(lines(full))  # the log reads as one run


def test_resume_refuses_another_base(tiny_lm, tiny_dir, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    train(settings(tiny_lm, data, save_every=2), run, progress=False)
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_dir("mistral"), other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_lm}/{name}", other / name)
    with pytest.raises(QDyLoRAError, match="another base model"):
        train(settings(str(other), data), run, resume=True, progress=False)


def test_out_dir_rules(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(QDyLoRAError, match="already exists and is not empty: use --overwrite"):
        train(settings(tiny_lm, data), run, progress=False)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    # --overwrite replaces a run, never another directory (it replaced a model's config.json)
    (run / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(QDyLoRAError, match="is not a qdylora run .*--overwrite only replaces a run"):
        train(settings(tiny_lm, data), run, overwrite=True, progress=False)
    assert (run / "config.json").read_text() == '{"model_type": "llama"}'
    (run / "config.json").unlink()
    (run / "notes.txt").unlink()
    train(settings(tiny_lm, data), run, overwrite=True, progress=False)  # empty: fine
    (run / "notes.txt").write_text("mine")
    train(settings(tiny_lm, data), run, overwrite=True, progress=False)  # a run: replaced
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only what a run writes
    with pytest.raises(QDyLoRAError, match="no checkpoint|not a qdylora run"):
        train(settings(tiny_lm, data), tmp_path / "fresh", resume=True, progress=False)


def test_gradient_checkpointing_gives_the_same_adapter(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    train(settings(tiny_lm, data, max_steps=3), tmp_path / "plain", progress=False)
    train(settings(tiny_lm, data, max_steps=3, grad_checkpointing=True), tmp_path / "ckpt", progress=False)
    a, b = load_file(tmp_path / "plain" / "adapter.safetensors"), load_file(tmp_path / "ckpt" / "adapter.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("lora_B"))
