"""Writing files so that a crash or a full disk never leaves a half-written one behind."""

from __future__ import annotations

import errno
import json
import os
import re
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
    tmp_path = _temp_file(path)
    try:
        yield tmp_path
        _fsync(tmp_path)
        # a writer may have replaced the temporary file with its own (safetensors 0.8 writes a
        # file of mode 0600 by its own rename): the output gets the mode any new file gets
        os.chmod(tmp_path, 0o666 & ~_umask())
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
    clear_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the directory a normal mode
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise _appeared(path)
            remove_tree(path)
        try:
            os.replace(tmp, path)
        except OSError as e:  # another command made `path` since the check above
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise _appeared(path) from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _appeared(path: Path) -> QDyLoRAError:
    return QDyLoRAError(f"{path} appeared while this command was writing it (another command writing the same "
                        "--out?): it was left as it is; use another --out, or --overwrite once the other is done")


def remove_tree(path: Union[str, os.PathLike]) -> None:
    """Delete a directory so that no reader ever sees it half deleted: it is first renamed to a
    hidden ".<name>.<random>.tmp" sibling (what a resume clears as a leftover), then removed; a
    process killed during the removal leaves that leftover, not a partial `path`."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.replace(path, aside)  # replaces the empty directory mkdtemp made
    shutil.rmtree(aside)


@contextmanager
def written_together(paths: list[Path], journal: Path) -> Iterator[dict[Path, Path]]:
    """Yield {path: temporary path} for files that must appear together (a sweep's json, csv and
    png); on success each replaces its path (`replace_together`), else the temporaries go."""
    finish_moves(journal)
    temps: dict[Path, Path] = {}
    try:
        for path in paths:
            temps[path] = _temp_file(path)
        yield temps
        for tmp in temps.values():
            _fsync(tmp)
        replace_together(temps, journal)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise


def replace_together(pairs: dict[Path, Path], journal: Path) -> None:
    """Move each finished temporary file (value) onto its path (key) so that the files appear
    together: the moves are written to `journal` first and the journal removed after the last
    one, so a process killed between two moves leaves a journal that `finish_moves` (run before
    the files are next read or written) completes."""
    with atomic_write(journal) as tmp:
        tmp.write_text(json.dumps({str(k): str(v) for k, v in pairs.items()}))
    finish_moves(journal)


def finish_moves(journal: Path) -> None:
    """Complete the moves a killed `replace_together` left in `journal`, if any."""
    try:
        pairs = json.loads(journal.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        journal.unlink(missing_ok=True)  # unreadable: its moves cannot be known; the files stay as they are
        return
    for final, tmp in pairs.items():
        if Path(tmp).exists():
            os.replace(tmp, final)
    journal.unlink(missing_ok=True)


TEMP_MARK = ".qdylora-"  # temporary names: ".<name>.qdylora-<pid>.<random>.tmp"
_TEMP = re.compile(r"^\..*\.qdylora-(\d+)\.[^.]*\.tmp$")


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file or directory qdylora writes before a rename."""
    return _TEMP.match(name) is not None


def _temp_file(path: Path) -> Path:
    """An empty temporary file beside `path`, named for it (`_prefix`), with a normal mode (mkstemp
    makes 0600); the leftovers of dead writers in that folder are cleared first."""
    clear_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A temporary directory in the system's temporary folder, removed after the block. It is
    named as qdylora's temporary files are (with this process's id), so the one a killed process
    left (kill -9: no cleanup runs) is removed by the next qdylora process that makes one."""
    parent = Path(tempfile.gettempdir())
    clear_stale(parent)
    with tempfile.TemporaryDirectory(prefix=_prefix(parent / name), suffix=".tmp", dir=parent) as path:
        yield Path(path)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _prefix(path: Path) -> str:
    return f".{path.name}{TEMP_MARK}{os.getpid()}."


def clear_stale(directory: Union[str, os.PathLike]) -> list[Path]:
    """Remove the temporary files and directories that qdylora processes no longer running left
    in `directory` (a kill -9 in the middle of a write); returns what was removed. Those of live
    processes, and every other file, are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        leftover = Path(directory) / name
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process has): leave its files
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
