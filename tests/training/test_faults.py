"""Faults during training: kill -9, damaged checkpoints, NaN loss, a full disk, Ctrl-C.

Each ends with the run directory readable and, where the run can go on, `--resume` finishing
with the adapter an uninterrupted run gives (bit-equal).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qdylora.errors import QDyLoRAError
from qdylora.training.rundir import _sha256, checkpoint_dirs, checkpoint_problem, stop_advice
from qdylora.training import trainer
from qdylora.data.datasets import load_data
from qdylora.errors import TrainingInterrupted
from qdylora.training.interrupts import STOP_SIGNALS
from qdylora.training.trainer import train

from ..conftest import tiny_settings as settings
from ..conftest import write_sums

OPTS = dict(max_steps=6, save_every=1, keep_last=3)


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def reference(tiny_lm, tmp_path_factory):
    """An uninterrupted run of OPTS, and its data file."""
    root = tmp_path_factory.mktemp("faults")
    data = write_sums(root / "sums.jsonl")
    run = root / "reference"
    train(settings(tiny_lm, data, **OPTS), run, progress=False)
    return run, data


def crash_after_step_5(step: int) -> None:
    """on_step hook: a crash after step 5, whose checkpoint (save_every 1) is the newest."""
    if step == 5:
        raise KeyboardInterrupt


def damage(path: Path, how: str) -> None:
    if how == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how.startswith("crafted"):  # another content, with a manifest that matches it
        if how == "crafted-empty":
            torch.save({}, path)
        else:
            path.write_bytes(b"not a torch file")
        manifest_file = path.parent / "manifest.json"
        manifest = json.loads(manifest_file.read_text())
        manifest[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest_file.write_text(json.dumps(manifest))
    else:
        path.unlink()


@pytest.mark.parametrize("name, how", [("adapter.safetensors", "flip"), ("adapter.safetensors", "truncate"),
                                       ("state.pt", "truncate"), ("state.pt", "delete"),
                                       ("state.pt", "crafted-empty"), ("state.pt", "crafted-garbage")])
def test_resume_falls_back_from_a_damaged_checkpoint(reference, tiny_lm, tmp_path, caplog, name, how):
    ref, data = reference
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_lm, data, **OPTS), run, progress=False, on_step=crash_after_step_5)
    newest = checkpoint_dirs(run)[-1]
    assert newest.name == "step-000005" and checkpoint_problem(newest) is None
    damage(newest / name, how)
    assert checkpoint_problem(newest) is not None
    with caplog.at_level("WARNING", logger="qdylora"):
        train(settings(tiny_lm, data, **OPTS), run, resume=True, progress=False)
    assert "step-000005 is damaged" in caplog.text  # the library logs it; the CLI shows it on stderr
    assert (run / "checkpoints" / "step-000005.damaged").is_dir()  # kept, out of the way
    assert_same_adapter(ref, run)


def test_a_second_damaged_checkpoint_of_the_same_step_is_moved_too(reference, tiny_lm, tmp_path, caplog):
    """"moved to step-N.damaged" was said, and nothing moved, when that name existed already."""
    ref, data = reference
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_lm, data, **OPTS), run, progress=False, on_step=crash_after_step_5)
    (run / "checkpoints" / "step-000005.damaged").mkdir()  # left by an earlier resume
    damage(checkpoint_dirs(run)[-1] / "state.pt", "truncate")
    with caplog.at_level("WARNING", logger="qdylora"):
        train(settings(tiny_lm, data, **OPTS), run, resume=True, progress=False)
    assert "moved to step-000005.damaged.1" in caplog.text
    assert (run / "checkpoints" / "step-000005.damaged.1" / "state.pt").is_file()
    assert_same_adapter(ref, run)


def test_resume_without_any_intact_checkpoint_is_an_error(reference, tiny_lm, tmp_path):
    _, data = reference
    run = tmp_path / "run"
    train(settings(tiny_lm, data, max_steps=2, save_every=1), run, progress=False)
    for checkpoint in checkpoint_dirs(run):
        damage(checkpoint / "adapter.safetensors", "flip")
    with pytest.raises(QDyLoRAError, match="none of its 2 checkpoints is intact"):
        train(settings(tiny_lm, data, max_steps=4, save_every=1), run, resume=True, progress=False)


def nan_at_step(monkeypatch, bad_step: int, accumulation: int = 2) -> None:
    """Make the loss NaN in every micro-batch of optimizer step `bad_step` (1-based)."""
    real, calls = trainer.loss_sum, {"n": 0}

    def loss_sum(model, batch):
        calls["n"] += 1
        total, n = real(model, batch)
        step = (calls["n"] - 1) // accumulation + 1
        return (total * float("nan"), n) if step == bad_step else (total, n)

    monkeypatch.setattr(trainer, "loss_sum", loss_sum)


def test_nan_loss_stops_at_that_step_and_keeps_the_checkpoints(reference, tiny_lm, tmp_path, monkeypatch):
    _, data = reference
    run = tmp_path / "run"
    nan_at_step(monkeypatch, 3)
    with pytest.raises(QDyLoRAError, match=r"step 3 \(ranks? [^)]+\): the loss is nan.*--skip-nonfinite"):
        train(settings(tiny_lm, data, **OPTS), run, progress=False)
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000001", "step-000002"]
    assert all(checkpoint_problem(c) is None for c in checkpoint_dirs(run))
    saved = load_file(run / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())  # the step-2 adapter, not NaN


def test_skip_nonfinite_skips_the_step_and_finishes(reference, tiny_lm, tmp_path, monkeypatch):
    _, data = reference
    run = tmp_path / "run"
    nan_at_step(monkeypatch, 3)
    summary = train(settings(tiny_lm, data, **OPTS, skip_nonfinite=True), run, progress=False)
    assert summary["steps"] == 6
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [3]
    saved = load_file(run / "adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(reference, tiny_lm, tmp_path, monkeypatch):
    _, data = reference
    run = tmp_path / "run"
    import qdylora.training.rundir as rundir

    real, calls = rundir.torch.save, {"n": 0}

    def save(obj, f):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint: write half, then the disk is full
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f)

    monkeypatch.setattr(rundir.torch, "save", save)
    with pytest.raises(QDyLoRAError, match=r"cannot write the step-3 checkpoint .*\(disk full\).*--resume"):
        train(settings(tiny_lm, data, **OPTS), run, progress=False)
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000001", "step-000002"]
    assert all(checkpoint_problem(c) is None for c in checkpoint_dirs(run))
    assert not list((run / "checkpoints").glob(".*")) and not list(run.glob(".*"))  # no temp files


@pytest.fixture
def small_filesystem(tmp_path):
    """A real tmpfs of a given size (root and mount needed: skipped where the machine has them not)."""
    mounted = []

    def make(size: int) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        pages = -(-size // 4096) * 4096
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here: {proc.stderr.strip()[:100]}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.mark.parametrize("room", ["half an adapter", "one checkpoint"])
def test_a_real_full_disk_is_one_line_and_resume_says_so_too(room, reference, tiny_lm, tmp_path, small_filesystem):
    """On a real full filesystem safetensors raises SafetensorError (and torch.save may raise
    RuntimeError), not the OSError a patched torch.save simulates: a traceback, resuming too."""
    ref, data = reference
    newest = checkpoint_dirs(ref)[-1]
    checkpoint = sum(f.stat().st_size for f in newest.iterdir())
    top = sum(f.stat().st_size for f in ref.iterdir() if f.is_file() and f.name != "adapter.safetensors")
    adapter = (newest / "adapter.safetensors").stat().st_size
    fs = small_filesystem(top + (adapter // 2 if room == "half an adapter" else 2 * adapter + 3 * checkpoint // 2))
    run = fs / "run"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, **OPTS).to_dict()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.run([sys.executable, "-m", "qdylora", "train", "--config", str(config), "--out", str(run)],
                           env=env, capture_output=True, text=True, timeout=300)
    again = subprocess.run([sys.executable, "-m", "qdylora", "train", "--resume", str(run)],
                           env=env, capture_output=True, text=True, timeout=300)
    for proc in (first, again):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("qdylora: error: cannot write the step-") and "(disk full)" in last, last
    assert f"--resume {run}" in last
    again_last = again.stderr.strip().splitlines()[-1]
    if room == "half an adapter":  # no checkpoint was ever written
        assert checkpoint_dirs(run) == []
        assert again_last == (f"qdylora: error: cannot resume: {run} has no checkpoint yet; "
                              "start it again with --overwrite")
    else:
        assert [c.name for c in checkpoint_dirs(run)] == ["step-000001"]
        assert checkpoint_problem(checkpoint_dirs(run)[0]) is None
        assert (again_last.startswith("qdylora: error: cannot write the step-2 checkpoint")
                and "(disk full)" in again_last)
    assert not list(run.rglob(".*"))  # no temp files


def as_in_a_terminal() -> None:
    """For a child process, before exec: the stop signals as a terminal's foreground job has
    them. The suite itself may run under nohup or as a background job of a script, where SIGHUP
    or SIGINT are ignored; a run keeps a signal ignored (by design, tested below)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)


@pytest.fixture
def terminal_signals():
    """This process's stop signals as in a terminal (Ctrl-C: KeyboardInterrupt) for the test."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    as_in_a_terminal()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # what Python installs over SIG_DFL at start
    yield
    for s, old in before.items():
        signal.signal(s, old if old is not None else signal.SIG_DFL)


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes_the_same(reference, tiny_lm, tmp_path, capsys,
                                                                 terminal_signals):
    ref, data = reference
    run = tmp_path / "run"
    opts = {**OPTS, "save_every": 0}  # only the interrupt writes a checkpoint before the end
    interrupt = lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 2 else None  # noqa: E731
    # The handler in place before the run (Python's default, or SIG_IGN under nohup or in a
    # background job) is the one in place after it.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"interrupted \(SIGINT\) after step 2.*--resume"):
        train(settings(tiny_lm, data, **opts), run, progress=False, on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is before
    assert [c.name for c in checkpoint_dirs(run)] == ["step-000002"]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    train(settings(tiny_lm, data, **opts), run, resume=True, progress=False)
    assert_same_adapter(ref, run)


def test_a_ctrl_c_lost_in_a_del_still_stops_the_run(reference, tiny_lm, tmp_path, monkeypatch, terminal_signals):
    """A real SIGINT that arrives while a `__del__` runs: Python drops its KeyboardInterrupt
    ("Exception ignored in ..."; seen in CI: it landed in regex's Group.__del__ while the
    tokenizer loaded, and the run trained to the end). The run must stop before training all
    the same, and leave nothing behind."""
    _, data = reference
    run = tmp_path / "run"
    lost = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: lost.append(u.exc_type))

    class RaisesInDel:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # its handler runs here, inside __del__

    def load_data_with_a_ctrl_c(*args):
        RaisesInDel()  # created and freed at once
        return load_data(*args)

    monkeypatch.setattr(trainer, "load_data", load_data_with_a_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_lm, data, **OPTS), run, progress=False)
    assert lost == [KeyboardInterrupt]  # the first one was really lost
    assert not run.exists()  # stopped before the run wrote anything
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_ignored_before_the_run_stays_ignored(reference, tiny_lm, tmp_path):
    """Under nohup SIGHUP is ignored: a closed terminal must not stop the run."""
    ref, data = reference
    run = tmp_path / "run"
    hangup = lambda step: os.kill(os.getpid(), signal.SIGHUP) if step == 2 else None  # noqa: E731
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        train(settings(tiny_lm, data, **OPTS), run, progress=False, on_step=hangup)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    assert json.loads((run / "summary.json").read_text())["steps"] == OPTS["max_steps"]
    assert_same_adapter(ref, run)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_to_a_real_process_checkpoints_and_exits_128_plus_it(signum, reference, tiny_lm, tmp_path):
    """Ctrl-C, and what SLURM / Kubernetes send before preempting (SIGTERM; SIGHUP when a
    terminal closes): SIGTERM used to kill the run at once, with no checkpoint and a summary
    left "running" that --resume then refused."""
    _, data = reference
    run = tmp_path / "run"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, max_steps=500, save_every=0).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "qdylora", "train", "--config", str(config), "--out", str(run)],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and '"rank"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.05)  # until a training step has been logged
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]  # 130, 143, 129: what a shell reports
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"qdylora: interrupted ({name}) after step ") and f"--resume {run}" in last
    step = int(last.split("after step ")[1].split(";")[0])
    assert [c.name for c in checkpoint_dirs(run)] == [f"step-{step:06d}"]
    assert checkpoint_problem(checkpoint_dirs(run)[0]) is None
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "qdylora", "train", "--resume", str(run), "--max-steps",
                              str(step + 1), "--quiet"], env={**os.environ, "PYTHONWARNINGS": "ignore"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def test_ctrl_c_before_the_first_checkpoint_does_not_advise_resume(tiny_lm, tmp_path):
    """Ctrl-C while the data is read (a real process, a real SIGINT): the run stops at once
    and used to advise `--resume` of a run with no checkpoint, which `--resume` then refused."""
    data = write_sums(tmp_path / "many.jsonl", n=200_000)  # reading and tokenizing takes seconds
    run = tmp_path / "run"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, max_steps=5).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "qdylora", "train", "--config", str(config), "--out", str(run)],
                            env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    deadline = time.time() + 120
    while not run.exists() and time.time() < deadline:
        time.sleep(0.01)  # the run directory is taken just before the model and data are loaded
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not checkpoint_dirs(run) and not (run / "metrics.jsonl").exists()  # it stopped before training
    assert "--resume" not in err and "qdylora: stopped before the run wrote anything: start it again" in err
    assert not run.exists()  # the directory it made for the run is gone again: the same command works


def test_stop_advice_names_resume_only_where_a_checkpoint_is(reference, tmp_path):
    ref, _ = reference
    assert "--resume" in stop_advice(ref)  # checkpoints kept
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text((ref / "config.json").read_text())  # a run stopped at step 0
    assert stop_advice(started) == ("stopped before the first checkpoint: there is nothing to resume; "
                                    f"start the run again with --out {started} --overwrite")


def newest_step(run: Path) -> int:
    found = checkpoint_dirs(run)
    return int(found[-1].name[5:]) if found else 0


def test_kill_9_at_random_points_then_resume_gives_the_same_adapter(reference, tiny_lm, tmp_path):
    """A real `qdylora train` process killed with SIGKILL three times (mid-step or mid-write:
    every step writes a checkpoint) and resumed: readable run directory each time, same adapter."""
    _, data = reference
    opts = {**OPTS, "max_steps": 40}  # long enough for three kills
    train(settings(tiny_lm, data, **opts), tmp_path / "uninterrupted", progress=False)
    run = tmp_path / "run"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, **opts).to_dict()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "qdylora", "train", "--config", config, "--out", str(run)]
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):
        args = cmd + (["--resume", str(run)] if checkpoint_dirs(run) else ["--overwrite"])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 3:
            start, deadline = newest_step(run), time.time() + 120
            while newest_step(run) <= start and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)  # wait until this process has written a checkpoint
            time.sleep(rng.uniform(0, 0.1))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        _, err = proc.communicate(timeout=300)
        json.loads((run / "config.json").read_text())  # readable after every kill
        assert all(checkpoint_problem(c) is None for c in checkpoint_dirs(run)), err.decode()[-500:]
        if proc.returncode == 0:
            break
    assert kills == 3 and proc.returncode == 0, err.decode()[-1000:]
    assert_same_adapter(tmp_path / "uninterrupted", run)


def test_a_checkpoint_without_manifest_from_an_older_qdylora_still_resumes(reference, tiny_lm, tmp_path):
    ref, data = reference
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(settings(tiny_lm, data, **OPTS), run, progress=False, on_step=crash_after_step_5)
    for checkpoint in checkpoint_dirs(run):
        (checkpoint / "manifest.json").unlink()
    train(settings(tiny_lm, data, **OPTS), run, resume=True, progress=False)
    assert_same_adapter(ref, run)


def test_a_run_directory_has_one_owner(reference, tiny_lm, tmp_path):
    """Two `qdylora train` on one --out both "succeeded" (every step twice in metrics.jsonl): the
    second, and a --resume while the first trains, are refused; after a kill -9 of the owner the
    run resumes (the lock died with the process)."""
    _, data = reference
    run = tmp_path / "run"
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, max_steps=100_000, save_every=1).to_dict()))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    train_cmd = [sys.executable, "-m", "qdylora", "train", "--config", str(config)]
    owner = subprocess.Popen(train_cmd + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while newest_step(run) < 1 and time.time() < deadline:
            time.sleep(0.05)  # until the owner has written a checkpoint
        for extra in (["--out", str(run), "--overwrite"], ["--resume", str(run)]):
            second = subprocess.run(train_cmd + extra, env=env, capture_output=True, text=True, timeout=300)
            assert second.returncode == 2, second.stderr[-2000:]
            assert second.stderr.strip().splitlines()[-1] == (
                f"qdylora: error: run directory {run} is in use by another qdylora train process: wait for it "
                "to finish (or stop it), or choose another --out")
        assert owner.poll() is None  # the owner was not disturbed
        # reading a run that is still training works, and says so
        sweep = subprocess.run([sys.executable, "-m", "qdylora", "export", str(run), "--rank", "2", "--out",
                                str(tmp_path / "mid-run")], env=env, capture_output=True, text=True, timeout=300)
        assert sweep.returncode == 0, sweep.stderr[-2000:]
        assert f"qdylora: warning: {run} is still training: this is its adapter after step " in sweep.stderr
    finally:
        owner.kill()
        owner.wait()
    resumed = subprocess.run([sys.executable, "-m", "qdylora", "train", "--resume", str(run), "--max-steps",
                              str(newest_step(run) + 1), "--quiet"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"rank"' in x]
    assert len(steps) == len(set(steps))  # no step logged twice


KILLED_BEFORE_VALIDATION = """
import json, os, signal, sys
from qdylora.training import trainer
from qdylora.training.settings import RunSettings
settings = RunSettings.from_dict(json.loads(open(sys.argv[1]).read()))
target = int(sys.argv[3])
real = trainer._evaluate
def evaluate(job, val_batches, eval_ranks, log, at_step, written=None):
    if at_step == target:  # the step's checkpoint is written, its validation not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(job, val_batches, eval_ranks, log, at_step, written)
trainer._evaluate = evaluate
trainer.train(settings, sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("target", [4, 6])  # a validation in the run (every 4 steps) and the last one
def test_a_kill_between_a_checkpoint_and_its_validation_loses_no_validation(reference, tiny_lm, tmp_path, target):
    """kill -9 after step N's checkpoint and before its validation lost that validation (2 in 10
    kills), and at the last step the resumed run ended "done" with no final validation. A real
    process is killed there (SIGKILL from inside the trainer's validation call); --resume then
    measures the missing validation first."""
    _, data = reference
    config = tmp_path / "settings.json"
    config.write_text(json.dumps(settings(tiny_lm, data, **{**OPTS, "eval_every": 4}).to_dict()))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_VALIDATION, str(config), str(run), str(target)],
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-800:]
    assert newest_step(run) == target
    train(settings(tiny_lm, data, **{**OPTS, "eval_every": 4}), run, resume=True, progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    validated = [x["step"] for x in lines if "val_loss" in x]
    assert validated == [0, 4, 6], validated  # each once, in order
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["val_loss_after"]
