"""Writing files so that a crash or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from .errors import QDyLoRAError


@contextmanager
def atomic_write(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    The temporary file is fsynced before the rename, and removed if the block raises, so
    `path` holds either its old content or the complete new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def refuse_existing(path: Union[str, os.PathLike], overwrite: bool,
                    ours: Optional[Callable[[str], bool]] = None) -> None:
    """An output directory that exists is only replaced with --overwrite, and only when all it
    holds is what qdylora writes there (`ours(name)` for each entry; None: only an empty one):
    replacing it must not delete a user's file."""
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise QDyLoRAError(f"{path} already exists: use --overwrite or another --out")
    if not path.is_dir():
        raise QDyLoRAError(f"{path} is a file, not an output directory: --overwrite does not replace it; "
                           "choose another --out")
    foreign = sorted(name for name in os.listdir(path) if ours is None or not ours(name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise QDyLoRAError(f"{path} holds files qdylora did not write there ({shown}): --overwrite only "
                           "replaces an earlier output; choose another --out")


@contextmanager
def atomic_dir(path: Union[str, os.PathLike], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it becomes `path` (replacing an
    existing one only if `overwrite`), so `path` is absent, old or complete, never partial."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory a normal mode
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            remove_tree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: Union[str, os.PathLike]) -> None:
    """Delete a directory so that no reader ever sees it half deleted: it is first renamed to a
    hidden ".<name>.<random>.tmp" sibling (what a resume clears as a leftover), then removed; a
    process killed during the removal leaves that leftover, not a partial `path`."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.replace(path, aside)  # replaces the empty directory mkdtemp made
    shutil.rmtree(aside)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
