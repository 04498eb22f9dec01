"""The settings refuse values a run cannot use, before anything is loaded or written."""

from __future__ import annotations

import pytest

from qdylora.cli import main
from qdylora.errors import QDyLoRAError
from qdylora.training.settings import DataSettings, TrainSettings

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value", [
    ("lr", INF), ("lr", NAN), ("lr", 0.0), ("epochs", INF), ("epochs", NAN), ("weight_decay", NAN),
    ("weight_decay", INF), ("max_grad_norm", NAN), ("max_grad_norm", INF), ("max_grad_norm", -1.0),
])
def test_float_settings_must_be_finite(field, value):
    """--lr inf trained to an all-NaN adapter and said "done"; --lr nan and --epochs inf crashed."""
    with pytest.raises(QDyLoRAError, match=field):
        TrainSettings(**{field: value})


def test_val_fraction_nan_is_refused():
    with pytest.raises(QDyLoRAError, match="val_fraction"):
        DataSettings(val_fraction=NAN)


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--epochs", "inf"), ("--alpha", "nan")])
def test_the_command_line_refuses_them_in_one_line(flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qdylora: error:") and "finite" in err[0]
    assert not out.exists()  # refused before anything was written


def test_a_step_size_above_what_trained_well_is_named():
    from qdylora import QDyLoRAConfig
    from qdylora.training.settings import HOT_STEP, RunSettings, TrainSettings

    assert RunSettings().step_size_warning() is None  # the default: alpha / 64 at lr 2e-4
    assert RunSettings(train=TrainSettings(lr=1e-2)).step_size_warning() is None  # PEFT's own scale: never
    small = RunSettings(adapter=QDyLoRAConfig(max_rank=8), train=TrainSettings(lr=1e-3))  # 2 x 1e-3, PEFT's r8
    assert small.step_size_warning() is None
    hot = RunSettings(adapter=QDyLoRAConfig(scaling="rslora"), train=TrainSettings(lr=5e-4))  # 2 x 5e-4
    assert "(scale x lr = 0.001) 8 times a PEFT QLoRA run's" in hot.step_size_warning() and HOT_STEP == 3e-4
    assert "--scaling standard" in hot.step_size_warning()
    cool = RunSettings(adapter=QDyLoRAConfig(scaling="rslora"), train=TrainSettings(lr=1e-4))  # 2 x 1e-4
    assert cool.step_size_warning() is None
