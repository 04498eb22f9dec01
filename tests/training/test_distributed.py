"""Data-parallel training with torch.distributed (gloo on loopback) on the tiny Llama."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from qdylora.training.trainer import train

from ..conftest import tiny_settings, write_sums


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_dropout(settings):
    return replace(settings, adapter=replace(settings.adapter, dropout=0.0))


@pytest.mark.parametrize("rule", ["step", "example"])
def test_two_processes_equal_one_process_with_the_same_global_batch(rule, tiny_lm, tmp_path):
    """torchrun, 2 processes x micro-batch 2 x accumulation 2 == 1 process x micro-batch 4 x 2,
    with one rank per step or a rank per example (each process runs its rows' ranks)."""
    data = write_sums(tmp_path / "sums.jsonl")
    opts = dict(max_steps=6, save_every=3, rank_rule=rule)
    one = no_dropout(tiny_settings(tiny_lm, data, micro_batch_size=4, **opts))
    train(one, tmp_path / "one", progress=False)

    two = no_dropout(tiny_settings(tiny_lm, data, micro_batch_size=2, **opts))
    config = tmp_path / "two.json"
    config.write_text(json.dumps(two.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "qdylora", "train", "--config", str(config),
           "--out", str(tmp_path / "two"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("qdylora: train data") == 1  # only process 0 logs
    assert "global batch 8 = micro-batch 2 x 2 processes x accumulation 2" in proc.stderr

    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    moved = max(v.abs().max().item() for k, v in a.items() if k.endswith("lora_B"))  # B starts at 0
    assert moved > 1e-2  # it trained: 6 Adam steps of lr 1e-2
    for key in a:
        # float32 sums in another order, amplified by Adam's normalisation: ~1e-5 after 6 steps
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)
    record = json.loads((tmp_path / "two" / "config.json").read_text())
    assert record["processes"] == 2 and record["global_batch"] == 8
    steps = lambda run: [json.loads(x)["rank"] for x in (run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                         if '"rank"' in x]
    assert steps(tmp_path / "two") == steps(tmp_path / "one")  # the same rank at every step
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


WORKER_LIMIT_S = 240  # the run takes ~15 s alone on 2 cores


def _worker(rank: int, port: int, tiny_lm: str, data: str, out: str, ranks: list[str], report: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a hang (a collective one process never reaches) prints every thread's stack and exits,
    # instead of blocking for the process group's 60-minute timeout
    faulthandler.dump_traceback_later(WORKER_LIMIT_S, exit=True)
    settings = tiny_settings(tiny_lm, data, max_steps=2, micro_batch_size=2, ranks=ranks[rank])
    try:
        train(settings, out, progress=False)
        message = "finished"
    except Exception as e:  # noqa: BLE001 - reported to the test
        message = f"{type(e).__name__}: {e}"
    # a file, written then renamed, not a multiprocessing.Queue: under load a worker's queue.put
    # once blocked until its time limit (its feeder thread waiting), and the report was lost
    Path(report + ".tmp").write_text(message)
    os.replace(report + ".tmp", report)


def test_a_rank_mismatch_between_processes_is_caught(tiny_lm, tmp_path):
    data = write_sums(tmp_path / "sums.jsonl")
    ctx = mp.get_context("spawn")
    port = free_port()
    reports = [tmp_path / f"report-{r}.txt" for r in (0, 1)]
    # daemonic: never left behind for pytest's exit to wait on, whatever happens here
    procs = [ctx.Process(target=_worker, args=(r, port, tiny_lm, data, str(tmp_path / "run"), ["2", "4"],
                                               str(reports[r])), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + WORKER_LIMIT_S + 30
    try:
        while not all(r.exists() for r in reports) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    results = {r: reports[r].read_text() for r in (0, 1) if reports[r].exists()}
    if len(results) < 2:
        pytest.fail(f"a process did not report within {WORKER_LIMIT_S + 30} s (its stack is in the captured "
                    f"stderr); reports: {results}, exit codes: {[p.exitcode for p in procs]}")
    for rank in (0, 1):
        assert "the processes disagree on the rank of step 1 (process 0: 2, process 1: 4)" in results[rank], results
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shard_takes_every_world_th_row_and_covers_short_batches():
    from qdylora.training.distributed import Processes, shard

    rows = list("abcde")
    assert shard(rows, Processes(0, 2)) == (["a", "c", "e"], 1.0)
    assert shard(rows, Processes(1, 2)) == (["b", "d"], 1.0)
    assert shard(["a"], Processes(1, 2)) == (["a"], 0.0)  # no row left: a weight-0 stand-in


def test_a_collective_returns_once_no_other_holder_is_left():
    """The wait behind the gloo teardown fix (distributed._released): it returns at once when
    the tensors are held as before, waits while something else still holds one (here a view,
    dropped by a thread after 0.2 s, standing for gloo's worker), and gives up after its limit."""
    import threading

    from qdylora.training.distributed import _released

    t = torch.zeros(1)
    start = time.monotonic()
    with _released([t]):
        pass
    assert time.monotonic() - start < 0.1

    holder = []
    start = time.monotonic()
    with _released([t]):
        holder.append(t.view(1))  # what the wait reads: the use count rises
        threading.Timer(0.2, holder.clear).start()
    assert 0.15 < time.monotonic() - start < 5 and not holder

    start = time.monotonic()
    with _released([t], limit_s=0.3):
        holder.append(t.view(1))  # never dropped: the wait stops at its limit
    assert 0.25 < time.monotonic() - start < 5
