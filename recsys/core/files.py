"""Small files the runs write (metrics, run info, resume settings, ids), each written atomically:
a kill mid-write leaves the old file or none, never a half-written one."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def write_with(path: Path, write: Callable[[Path], object]) -> Path:
    """Atomic write of any format: ``write(tmp)`` fills a temp file beside ``path``, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> None:
    """Atomic text write: a temp file beside ``path``, then a rename."""
    write_with(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (indented, sorted keys)."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=True))
