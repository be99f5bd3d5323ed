"""Small files the runs write (metrics, run info, resume settings, ids, checkpoints), each written atomically
and safely:

- a kill or a full disk mid-write leaves the old file or none, never a half-written one (a temp file beside
  the target, then one rename; the temp file is removed when the write fails);
- no symbolic link is followed: a link planted at the target (or at the temp name) is replaced, never
  written through, so a file outside the run folder is never overwritten;
- a folder the user cannot write is found before anything heavy runs (:func:`check_writable`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from recsys.core.errors import UserError


def write_with(path: Path, write: Callable[[Path], object]) -> Path:
    """Atomic write of any format: ``write(tmp)`` fills a fresh temp file beside ``path`` (created here with
    O_EXCL, so it is no link), then one rename replaces ``path`` (a link there is replaced, not followed).
    On any failure the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 -> the user's umask, as a plain open would give
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Atomic text write: a temp file beside ``path``, then a rename."""
    write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (indented, sorted keys)."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path, fix: str | Callable[[], str], error: type[UserError] = UserError) -> dict:
    """A JSON object file this project wrote; ``error`` (one line naming the file and ``fix``, a text or a
    function making it) when it is not one."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({str(e).splitlines()[0]}); {fix if isinstance(fix, str) else fix()}") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}; {fix if isinstance(fix, str) else fix()}")
    return obj


def check_writable(folder: str | os.PathLike, what: str, key: str) -> None:
    """UserError (one line naming ``folder`` and the setting ``key`` that moves it) unless files can be
    created in ``folder``, or in the nearest existing folder above it (it is created later)."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder} cannot be written ({probe} is read-only or not a folder): make it "
                        f"writable or set {key}=<a writable folder>")
