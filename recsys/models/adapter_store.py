"""The adapter store: trained adapters in peft's own format, with the scoring head and a manifest.

Layout: ``<root>/<backbone>/<name>/`` holding ``adapter_config.json`` and
``adapter_model.safetensors`` (plain ``peft.PeftModel.from_pretrained`` loads them), ``head.safetensors``
(the scoring head) and ``manifest.json`` (backbone, domain, data settings, metrics). ``<name>`` is
the domain for a per-domain LoRA and ``hybrid-<a>+<b>`` (sorted: order-free) for a WeaveRec hybrid.
Writes are atomic: a temporary folder beside the final one, renamed into place; the previous
version is only removed once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
HEAD = "head.safetensors"
READ: list[Path] = []  # adapter folders this process has read (load_head), in order: a run's inputs (recsys/tracking.py)


def hybrid_name(*domains: str) -> str:
    """Order-free name of a hybrid adapter: ``hybrid_name("games", "beauty") == "hybrid-beauty+games"``."""
    return "hybrid-" + "+".join(sorted(domains))


class AdapterStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, backbone: str, name: str) -> Path:
        return self.root / backbone.replace(":", "-").replace("/", "--") / name

    def exists(self, backbone: str, name: str) -> bool:
        return (self.path(backbone, name) / MANIFEST).is_file()

    def save(self, backbone: str, name: str, peft_model, adapter_name: str, head: torch.nn.Module | None,
             manifest: dict, extra: Callable[[Path], None] | None = None) -> Path:
        """Save one adapter of ``peft_model`` (+ head + manifest) atomically; returns the folder.

        ``extra(folder)``, if given, writes more files into the (temporary) folder before the manifest.
        """
        final = self.path(backbone, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{name}.tmp-{os.getpid()}-{time.time_ns()}"
        try:
            peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
            sub = tmp / adapter_name if adapter_name != "default" else tmp
            if sub != tmp:  # peft nests non-default adapters in a sub-folder: flatten
                for f in sub.iterdir():
                    shutil.move(str(f), tmp / f.name)
                sub.rmdir()
            if head is not None:
                save_file({k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()},
                          str(tmp / HEAD))
            if extra is not None:
                extra(tmp)
            manifest = {**manifest, "backbone": backbone, "name": name, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))  # written last: marks complete
            old = None
            if final.exists():
                old = final.parent / f".{name}.old-{time.time_ns()}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load_manifest(self, folder: str | os.PathLike) -> dict:
        f = Path(folder) / MANIFEST
        if not f.is_file():
            raise FileNotFoundError(f"{folder} is not a complete adapter folder (no {MANIFEST})")
        return json.loads(f.read_text())

    @staticmethod
    def load_head(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
        READ.append(Path(folder))
        f = Path(folder) / HEAD
        return load_file(str(f)) if f.is_file() else None
