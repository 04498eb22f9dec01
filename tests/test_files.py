"""files: a directory killed mid-removal is whole or gone, never partial; what a killed writer or
reader left is removed by the next one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from qdylora.files import remove_tree

REMOVER = """
import sys
{imports}
print("go", flush=True)
{call}(sys.argv[1])
"""


def test_remove_tree_removes(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f").write_text("x")
    remove_tree(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def killed_removals(tmp_path, imports: str, call: str, attempts: int = 6, files: int = 4000) -> set[str]:
    """Directories of `files` files removed by a real process killed with SIGKILL a random moment
    after it starts removing: what each left ("whole", "gone" or "partial")."""
    tmp_path.mkdir()
    rng = random.Random(0)
    outcomes = set()
    for attempt in range(attempts):
        target = tmp_path / f"step-{attempt}"
        target.mkdir()
        for i in range(files):
            (target / f"f{i}").write_text("x")
        proc = subprocess.Popen([sys.executable, "-c", REMOVER.format(imports=imports, call=call), str(target)],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"go"
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n = len(list(target.iterdir())) if target.exists() else 0
        outcomes.add("gone" if not target.exists() else "whole" if n == files else "partial")
    return outcomes


def test_a_removal_killed_with_sigkill_leaves_the_directory_whole_or_gone(tmp_path):
    """The fault of checkpoint pruning (tests/training/test_faults.py's kill -9 test once found a
    half-deleted checkpoint): plain shutil.rmtree leaves partial directories under SIGKILL,
    remove_tree never does (a leftover is a hidden .tmp sibling, which resume clears)."""
    assert "partial" in killed_removals(tmp_path / "plain", "import shutil", "shutil.rmtree")
    outcomes = killed_removals(tmp_path / "ours", "from qdylora.files import remove_tree", "remove_tree")
    assert "partial" not in outcomes
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") or p.name.startswith("step-")
               for p in (tmp_path / "ours").iterdir())


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
from qdylora.files import atomic_dir, atomic_write
target = Path(sys.argv[1])
with {writer}(target) as tmp:
    {fill}
    os.kill(os.getpid(), signal.SIGKILL)  # mid-write: a kill -9 of merge, export or sweep
"""


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A merge / export killed while writing left `.out.XXXX.tmp/` (a partial model) that nothing
    removed; now the next write beside it removes the leftovers of processes that are gone."""
    from qdylora.files import atomic_dir, atomic_write

    cases = {"atomic_dir": ("(tmp / 'model.safetensors').write_bytes(b'0' * 2**20)", tmp_path / "merged"),
             "atomic_write": ("tmp.write_bytes(b'0' * 2**20)", tmp_path / "sweep.json")}
    for writer, (fill, target) in cases.items():
        proc = subprocess.run([sys.executable, "-c", KILLED_WRITE.format(writer=writer, fill=fill), str(target)])
        assert proc.returncode == -signal.SIGKILL
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.qdylora-")]
        assert len(leftovers) == 1 and not target.exists()
    live = tmp_path / f".other.qdylora-{os.getpid()}.x.tmp"  # a live process's temporary: kept
    live.write_text("x")
    (tmp_path / "users.tmp").write_text("x")  # not ours: kept
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "model.safetensors").write_text("new")
    with atomic_write(tmp_path / "sweep.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "sweep.json", live.name, "users.tmp"])


KILLED_MOVES = """
import os, signal, sys
from pathlib import Path
from qdylora import files
out = Path(sys.argv[1])
paths = [out / "sweep.json", out / "sweep.csv", out / "sweep.png"]
moves = []
real = os.replace
def replace(src, dst):
    moves.append(dst)
    if len(moves) == 3:  # after the journal and the first file: two of the three still to go
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
files.os.replace = replace
with files.written_together(paths, out / ".sweep.moves.json") as tmp:
    for path, t in tmp.items():
        t.write_text("new " + path.name)
"""


def test_files_written_together_appear_together_after_a_kill(tmp_path):
    """A sweep killed between the renames of its three files left a new sweep.json beside an old
    sweep.png; the journal it leaves is completed before the files are next read or written."""
    from qdylora.files import finish_moves

    for name in ("sweep.json", "sweep.csv", "sweep.png"):
        (tmp_path / name).write_text("old " + name)
    proc = subprocess.run([sys.executable, "-c", KILLED_MOVES, str(tmp_path)])
    assert proc.returncode == -signal.SIGKILL
    contents = {p.name: p.read_text() for p in tmp_path.glob("sweep.*")}
    assert sorted(v.split()[0] for v in contents.values()) == ["new", "old", "old"]  # mixed: the fault
    finish_moves(tmp_path / ".sweep.moves.json")
    assert {p.name: p.read_text() for p in tmp_path.glob("sweep.*")} == {
        n: "new " + n for n in ("sweep.json", "sweep.csv", "sweep.png")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.json", "sweep.png"]


def test_an_output_that_appears_during_a_write_is_one_line(tmp_path):
    """Two exports racing for one --out: the loser said `qdylora: error: out/race` (a FileExistsError
    without text)."""
    import pytest

    from qdylora import QDyLoRAError
    from qdylora.files import atomic_dir

    out = tmp_path / "race"
    with pytest.raises(QDyLoRAError, match="appeared while this command was writing it"):
        with atomic_dir(out) as tmp:
            (tmp / "adapter_model.safetensors").write_text("mine")
            out.mkdir()  # the other command got there first
            (out / "adapter_model.safetensors").write_text("theirs")
    assert (out / "adapter_model.safetensors").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["race"]


KILLED_READ = """
import os, signal, sys
import qdylora.data.rows as rows
original = rows._load_dataset
def load(*args, **kwargs):  # inside the read, once datasets has written its cache: kill -9
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
rows._load_dataset = load
rows.read_rows(sys.argv[1])
"""


def test_the_read_cache_a_killed_process_left_is_removed_by_the_next_read(tmp_path):
    """kill -9 while reading a data file left qdylora-read-*/ (its Arrow cache, 24 MB for a big
    file) in the system temp folder forever; the next read now removes it."""
    import json

    from qdylora.data.rows import read_rows

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(200)))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    proc = subprocess.run([sys.executable, "-c", KILLED_READ, str(data)], env=env)
    assert proc.returncode == -signal.SIGKILL
    left = list(temp.iterdir())
    assert len(left) == 1 and any(left[0].rglob("*.arrow")), left  # the cache, written before the kill
    import tempfile
    old, tempfile.tempdir = tempfile.tempdir, str(temp)
    try:
        assert len(read_rows(str(data))) == 200
    finally:
        tempfile.tempdir = old
    assert list(temp.iterdir()) == []


def test_written_files_get_the_mode_new_files_get(tmp_path):
    """safetensors 0.8 writes its file by its own rename with mode 0600, so every adapter and
    checkpoint came out readable by its owner only (a server under another user could not load
    it); an atomically written file now has the mode any new file gets (0666 less the umask)."""
    import torch
    from safetensors.torch import save_file

    from qdylora.files import atomic_write

    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "adapter.safetensors"
    with atomic_write(path) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
