"""The adapter store: trained adapters in peft's own format, with the scoring head and a manifest.

Layout: ``<root>/<backbone>/<name>/seed-<seed>/`` holding ``adapter_config.json`` and
``adapter_model.safetensors`` (plain ``peft.PeftModel.from_pretrained`` loads them), ``head.safetensors``
(the scoring head, under ``scoring=head``) and ``manifest.json`` (backbone, domain, seed, data settings,
metrics). ``<name>`` is the domain for a per-domain LoRA, ``hybrid-<a>+<b>`` (sorted: order-free) for a
WeaveRec hybrid, ``joint-<T>-with-<S...>`` for a joint LoRA and ``weaverec-<T>-from-<S...>`` for a WeaveRec
merge (:func:`hybrid_name`, :func:`joint_name`, :func:`weaverec_name`).

The store's rules (every consumer asks the store; none looks at the folders itself):

- **One adapter per seed.** A run exports into, and reads from, the folder of its own ``seed``: a seed sweep
  keeps every seed's adapter, and an X-Cross run with ``seed=0`` reads the seed-0 sources. A folder from
  before this layout (``<name>/`` holding the files) is read by a run of the seed its manifest records;
  one whose manifest records no seed is ambiguous and refused (:class:`StoreError`).
- **Complete or absent.** An adapter exists only when every file is there (manifest, adapter config,
  weights, and the head when it was trained with ``scoring=head``); :meth:`AdapterStore.problem` names
  what an incomplete folder lacks, and :meth:`AdapterStore.verify` names a truncated or corrupt file.
- **Atomic, never lost.** ``seed-<s>`` is a symbolic link to a complete version folder
  (``.seed-<s>.v-<time>``), swapped by one rename under a file lock (``.seed-<s>.lock``): two runs
  exporting at once both finish (the later one wins), and a reader sees the old or the new adapter, never
  none. The replaced version is kept until the next export, so a reader still loading it finishes.
- Files and folders get the user's umask (group-readable on a shared store), not safetensors' 0600.
- **Fits or says why.** Whether a stored adapter fits a run is :func:`mismatch`'s answer, and only its:
  the manifest's recorded settings against what the run expects (an :class:`AdapterSpec`'s ``expect``).
- **One manifest.** What a manifest records is built here: :func:`run_record` (the run that trained it)
  and :func:`lora_record` (how the adapter is built); :func:`save_head` writes every head file.
- **Knows its data.** A store built for a run (``data=`` the run's domain fingerprints,
  ``recsys.data.domain.Domain.fingerprint``) stamps each export's manifest with the fingerprints of the
  adapter's own domains (``data_fingerprint``), and :meth:`AdapterStore.data_problem` refuses an adapter
  whose recorded fingerprint differs from the run's data (one line naming both). An adapter stored
  before fingerprints (no ``data_fingerprint``) is accepted with a warning when the data settings it
  records (``data.root``, the domain's spec) are the run's, refused in one line otherwise.
- **One store a data root.** :func:`data_store` derives the store folder from the data: the folder of a
  collection belongs to the data root that first exported into it (``collection.json``, or the
  ``data.root`` its manifests record); another root under the same collection name (your own ``beauty``
  with ``data=amazon``) gets ``<collection>-<folder>-<hash of its path>`` and never replaces the shared
  domain's adapters.
- **Untampered.** Every export records the sha256 of each file (``sha256``); :meth:`AdapterStore.verify`
  refuses a file changed since, even one that is still valid safetensors.
- **Never worse.** An export does not replace a stored adapter of the same data and evaluation settings
  whose validation ``monitor`` is better, unless ``force`` (``export_adapter=force``).
- **Plain names, no litter.** Adapter names are plain names (no ``/``, no ``..``: :func:`check_name`);
  each export removes what killed exports left (``.tmp-*`` folders of dead processes, ``.link-*`` links).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from recsys.core.errors import UserError
from recsys.core.files import read_json, umask, write_json
from recsys.models.card import write_card

log = logging.getLogger("recsys")
MANIFEST = "manifest.json"
HEAD = "head.safetensors"
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
COLLECTION = "collection.json"  # in a store's root: the data root whose adapters it holds (data_store)
FINGERPRINT = "data_fingerprint"  # manifest key: {domain: fingerprint of its data as read}
CHECKSUMS = "sha256"  # manifest key: {file: sha256} of every file exported beside the manifest
# data settings that fix the validation set: exports compare validation only when these are equal
SAME_VALIDATION = ("num_negatives", "max_eval_users", "candidate_sampling", "candidates", "train_on_val",
                   "selection_share", "max_history", "protocol")


class StoreError(UserError):
    """A stored adapter that is ambiguous, incomplete or unreadable; the message names the folder or file."""


class SourceAdapterError(StoreError):
    """Missing or incompatible source adapters (the message names each and how to produce it)."""


# ---------------------------------------------------------------------------------------------- names
def hybrid_name(*domains: str) -> str:
    """Order-free name of a hybrid adapter: ``hybrid_name("games", "beauty") == "hybrid-beauty+games"``."""
    return "hybrid-" + "+".join(sorted(domains))


def joint_name(target: str, sources, steps: str = "epochs") -> str:
    """Store name of a joint adapter: ``joint-games-with-beauty+toys`` (sources sorted); trained at the
    target-only number of steps (``steps=equal``): ``joint-games-with-beauty+toys-equal-steps``."""
    return f"joint-{target}-with-" + "+".join(sorted(sources)) + ("-equal-steps" if steps == "equal" else "")


def weaverec_name(target: str, sources) -> str:
    """Store name of a WeaveRec merge: ``weaverec-games-from-beauty+toys`` (sources sorted)."""
    return f"weaverec-{target}-from-" + "+".join(sorted(sources))


def check_name(name: str, what: str = "adapter name") -> str:
    """``name`` if it is a plain name: one store folder, never a path (``../x`` would write outside the
    store); StoreError otherwise (empty, a ``/``, ``\\`` or NUL, a leading dot, over 200 characters)."""
    if not isinstance(name, str) or not name or name.startswith(".") or len(name) > 200 \
            or any(c in name for c in "/\\\0"):
        raise StoreError(f"{what} {name!r} is not a plain name (no '/', '\\', leading dot or NUL): rename the "
                         "domain (its folder under data.root, or its key in data.domains)")
    return name


def store_dir_name(backbone: str) -> str:
    """A file-system safe folder name of a backbone (``embedded:minilm-l6`` -> ``embedded-minilm-l6``)."""
    return backbone.replace(":", "-").replace("/", "--")


# ---------------------------------------------------------------------------------------------- specs and fit
@dataclass(frozen=True)
class AdapterSpec:
    """An adapter a method needs from the store (``RecModule.required_adapters``).

    Attributes:
        name: the store name (a domain for a per-domain LoRA, ``hybrid-<a>+<b>``...).
        expect: manifest values it must record to fit the run (:func:`mismatch`; ``data.<key>`` reads the
            manifest's data settings); a stored adapter that does not fit counts as absent.
        trainable: the pipeline can train it when missing (``method=lora data.target=<name>``, ``train_missing``).
        optional: the method copes without it (it trains it itself, e.g. a WeaveRec hybrid): not an error.
        strict: a setting that the manifest does not record does not fit (:func:`mismatch`).
    """

    name: str
    expect: Mapping[str, object] = field(default_factory=dict)
    trainable: bool = True
    optional: bool = False
    strict: bool = False


def _recorded(manifest: Mapping, key: str):
    """The manifest's value of ``key`` (``data.a.b``: nested in the data settings); a sentinel if absent."""
    node = manifest
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


_ABSENT = object()


def mismatch(manifest: Mapping, expect: Mapping[str, object], strict: bool = False) -> str | None:
    """Why a stored adapter whose manifest is ``manifest`` does not fit a run expecting ``expect``
    (manifest key -> value; ``data.<key>`` a data setting), or None when it fits. A key the manifest does
    not record fits unless ``strict`` (a data key fits whenever the manifest records no data at all)."""
    for key, want in expect.items():
        have = _recorded(manifest, key)
        if have is _ABSENT and (not strict or (key.startswith("data.") and "data" not in manifest)):
            continue
        have = None if have is _ABSENT else have
        if have != want:
            if key == "backbone":
                return f"trained on backbone {have!r}, not {want!r}"
            if key == "scoring":
                return f"trained with scoring={have}, not scoring={want}"
            if key.startswith("data.domains."):
                return f"{key} differs"
            return f"{key} {have!r} != {want!r}"
    return None


# ---------------------------------------------------------------------------------------------- manifests
def run_record(method: str, domain: str, data: Mapping, seed: int, metrics: Mapping, run_dir: str,
               precision: str) -> dict:
    """The manifest fields of the run that trained an adapter (every export writes them)."""
    return {"method": method, "domain": domain, "data": dict(data), "seed": seed,
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))},
            "run_dir": run_dir, "precision": precision}


def lora_record(lora, scoring: str, **extra) -> dict:
    """The manifest fields that say how a LoRA adapter is built (what a consumer's ``expect`` compares)."""
    return {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules),
            "scoring": scoring, **extra}


def save_head(head: torch.nn.Module, path: str | os.PathLike) -> None:
    """A scoring head's weights as float32 safetensors (the store's ``head.safetensors``)."""
    save_file({k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}, str(path))


def load_into(model, folders: Mapping[str, str | os.PathLike], trainable: bool = False):
    """Stored adapters ``{adapter name: folder}`` loaded into ``model`` (a transformers model: a new
    PeftModel; a PeftModel: added to it); returns the PeftModel."""
    from peft import PeftModel

    for name, folder in folders.items():
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
        else:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable)
    return model


def _apply_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the modes the user's umask allows (safetensors: 0600)."""
    mask = umask()
    for top, _, files in os.walk(folder):
        os.chmod(top, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(top, f), 0o666 & ~mask)


def _read_json(path: Path, folder: Path) -> dict:
    return read_json(path, lambda: _rebuild_hint(folder), StoreError)


def _manifest_or_none(folder: Path) -> dict | None:
    """The manifest of the adapter at ``folder`` (a link is followed), or None when there is none readable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def lora_command(domain: str, seed=None, before: Sequence[str] = (), options: Sequence[str] = ()) -> str:
    """The command that trains and stores ``domain``'s per-domain LoRA adapter (the only place it is written):
    ``python train.py <before> method=lora <options> data.target=<domain> [seed=<seed>]``, shell-quoted."""
    parts = ["python", "train.py", *before, "method=lora", *options, f"data.target={domain}"]
    parts += [f"seed={seed}"] if seed is not None else []
    return " ".join(shlex.quote(p) for p in parts)


def _rebuild_hint(folder: Path) -> str:
    """How to rebuild a broken stored adapter (from its manifest, when that one is readable)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        m = {}
    run = f" (its run folder: {m['run_dir']})" if m.get("run_dir") else ""
    command = lora_command(m.get("domain", "<domain>"), m.get("seed", "<seed>"))
    return (f"rebuild it by running again the training that exported it{run}, e.g. for a per-domain LoRA "
            f"'{command}' with that run's other settings: the new export replaces it")


def _check_safetensors(path: Path, folder: Path) -> None:
    """A safetensors file whose header parses and whose size covers every tensor it declares."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > 100_000_000:
                raise ValueError("no header")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        size = path.stat().st_size
        if size != 8 + n + end:
            raise ValueError(f"{size} bytes, the header declares {8 + n + end}")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: truncated or corrupt safetensors file ({e}); {_rebuild_hint(folder)}") from None


# ---------------------------------------------------------------------------------------------- data and files
_SHA: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: each file hashed once a process


def file_sha256(path: Path) -> str:
    """The sha256 of a file (cached while it is unchanged on disk)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def checksums(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of an adapter folder but its manifest and a dense model."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST and p.relative_to(folder).parts[0] != "dense"}


def adapter_domains(manifest: Mapping) -> list[str]:
    """The domains an adapter was trained on, as its manifest says (a hybrid's pair, a joint's target and
    sources, a LoRA's domain)."""
    if manifest.get("domains"):
        return [str(d) for d in manifest["domains"]]
    return [str(d) for d in [manifest.get("domain"), *(manifest.get("sources") or [])] if d]


def _same_place(a, b) -> bool:
    return (os.path.realpath(str(a)) if a else None) == (os.path.realpath(str(b)) if b else None)


def store_owner(root: Path) -> str | None:
    """The data root whose adapters the store folder ``root`` holds: its ``collection.json``, else (a store
    from before) the ``data.root`` its first manifest records, else None (no owner yet)."""
    claim = root / COLLECTION
    if claim.is_file():
        try:
            return json.loads(claim.read_text()).get("data_root")
        except ValueError:
            return None
    for m in sorted(root.glob(f"*/*/seed-*/{MANIFEST}")) + sorted(root.glob(f"*/*/{MANIFEST}")):
        try:
            recorded = (json.loads(m.read_text()).get("data") or {}).get("root")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded:
            return os.path.realpath(recorded)
    return None


def data_store(root: str | os.PathLike, data_root: str | None) -> Path:
    """The store folder of the adapters of the data at ``data_root`` (``paths.adapter_store`` as configured:
    ``<store>/<collection>``): that folder when it holds this root's adapters or none yet, else
    ``<collection>-<root folder name>-<hash of its path>`` beside it, so two data roots under one collection
    name (``data=amazon`` with your own ``data.root``) never share, nor replace, adapters."""
    root = Path(root)
    if not data_root:
        return root
    here = os.path.realpath(str(data_root))
    owner = store_owner(root)
    if owner is None or _same_place(owner, here):
        return root
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(here).name) or "data"
    return root.with_name(f"{root.name}-{slug}-{hashlib.sha256(here.encode()).hexdigest()[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_litter(folder: Path, name: str, max_age_s: float = 86400.0) -> None:
    """Remove what killed exports of adapter ``name`` left in ``folder``: temp folders of processes of this
    host that are gone (or older than ``max_age_s``, from any host) and ``.link-*`` links (made and renamed
    under the adapter's lock, which the caller holds)."""
    host = socket.gethostname()
    for p in folder.glob(f".{name}.tmp-*"):
        parts = p.name.split(".tmp-", 1)[1].split("-", 2)  # <time>-<pid>-<host>
        dead = len(parts) == 3 and parts[2] == host and parts[1].isdigit() and not _alive(int(parts[1]))
        try:
            old = time.time() - p.lstat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if dead or old:
            shutil.rmtree(p, ignore_errors=True)
    for p in folder.glob(f".{name}.link-*"):
        if p.is_symlink():
            p.unlink(missing_ok=True)


def stored_is_better(stored: Mapping | None, new: Mapping, monitor: str) -> str | None:
    """Why an export must not replace the adapter whose manifest is ``stored`` (None: it may): the same
    data and validation settings, and a better validation ``monitor`` than the new one's."""
    if not stored:
        return None
    old_fp, new_fp = stored.get(FINGERPRINT) or {}, new.get(FINGERPRINT) or {}
    if any(old_fp.get(d) != v for d, v in new_fp.items()) or not new_fp and old_fp:
        return None  # other data: not comparable
    old_data, new_data = stored.get("data") or {}, new.get("data") or {}
    if any(old_data.get(k) != new_data.get(k) for k in SAME_VALIDATION):
        return None  # another validation set: not comparable
    a, b = (m.get("metrics", {}).get(monitor) for m in (stored, new))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
        return (f"not exported: the stored adapter (run {stored.get('run_dir', '?')}) has the better validation on "
                f"the same data ({monitor} {a:.4f} > {b:.4f} of this run); export_adapter=force replaces it")
    return None


class AdapterStore:
    """The adapters of one store root, for the runs of one ``seed`` (see the module docstring's rules)."""

    def __init__(self, root: str | os.PathLike, seed: int = 0, data: Mapping[str, str] | None = None,
                 settings: Mapping | None = None, monitor: str = "val/ndcg@10", force: bool = False):
        """``data``: the run's ``{domain: fingerprint}`` (None: a store that checks no data, e.g. a tool's);
        ``settings``: the run's data settings (an old adapter's are compared with them); ``monitor`` and
        ``force``: whether an export may replace a stored adapter of better validation."""
        self.root, self.seed = Path(root), int(seed)
        self.data, self.settings = dict(data or {}), dict(settings or {})
        self.monitor, self.force = monitor, bool(force)

    def backbone_dir(self, backbone: str) -> Path:
        return self.root / store_dir_name(backbone)

    def _link(self, backbone: str, name: str) -> Path:
        return self.backbone_dir(backbone) / check_name(name) / f"seed-{self.seed}"

    def path(self, backbone: str, name: str) -> Path:
        """The folder of adapter ``name`` for this seed (the version ``seed-<s>`` points at, so a reader keeps
        reading one version while another run exports); a folder of the old layout if its manifest records
        this seed. Raises StoreError when an old-layout folder records no seed (ambiguous)."""
        link = self._link(backbone, name)
        if link.exists():
            return link.resolve()
        old = link.parent
        if (old / MANIFEST).is_file():
            seed = _read_json(old / MANIFEST, old).get("seed")
            if seed is None:
                raise StoreError(
                    f"{old} (stored before adapters were kept per seed) records no seed: it is ambiguous which "
                    f"runs it belongs to. Move its files into {link}/ if it was trained with seed={self.seed}, "
                    "or delete it and train it again"
                )
            if int(seed) == self.seed:
                return old
        return link

    @staticmethod
    def missing_files(folder: str | os.PathLike) -> list[str]:
        """The files a complete adapter folder needs and ``folder`` lacks ([] : complete)."""
        folder = Path(folder)
        missing = [f for f in (MANIFEST, CONFIG) if not (folder / f).is_file()]
        if not any((folder / w).is_file() for w in WEIGHTS):
            missing.append(WEIGHTS[0])
        if MANIFEST not in missing:
            scoring = _read_json(folder / MANIFEST, folder).get("scoring", "head")
            if scoring == "head" and not (folder / HEAD).is_file():
                missing.append(HEAD)
        return missing

    def problem(self, backbone: str, name: str) -> str:
        """Why adapter ``name`` cannot be used ('' if it is complete): absent, or which files it lacks."""
        for _ in range(50):
            folder = self.path(backbone, name)
            try:
                missing = self.missing_files(folder) if folder.is_dir() else None
            except FileNotFoundError:  # removed while read
                missing = None
            if missing == []:
                return ""
            if self.path(backbone, name) == folder:  # the link did not move while we looked: this is the
                break  # current version (never removed), so the answer holds
            # else the version looked at was replaced, and may be half removed by a later export: look again
        return f"{folder} is incomplete (lacks {', '.join(missing)})" if missing else f"no adapter at {folder}"

    def exists(self, backbone: str, name: str) -> bool:
        """A complete adapter ``name`` of this seed is stored."""
        return not self.problem(backbone, name)

    @staticmethod
    def verify(folder: str | os.PathLike) -> None:
        """Raise StoreError naming the file if an adapter folder lacks a file or holds a broken one."""
        folder = Path(folder)
        missing = AdapterStore.missing_files(folder) if (folder / MANIFEST).is_file() else \
            [f for f in (CONFIG,) if not (folder / f).is_file()]  # a plain peft folder: no manifest, maybe no head
        if missing:
            raise StoreError(f"{folder} is not a complete adapter folder (lacks {', '.join(missing)}); "
                             f"{_rebuild_hint(folder)}")
        _read_json(folder / CONFIG, folder)
        for f in (WEIGHTS[0], HEAD):
            if (folder / f).is_file():
                _check_safetensors(folder / f, folder)
        if (folder / MANIFEST).is_file():
            for name, want in (_read_json(folder / MANIFEST, folder).get(CHECKSUMS) or {}).items():
                f = folder / name
                if f.is_file() and file_sha256(f) != want:
                    raise StoreError(f"{f}: changed since it was exported (sha256 {file_sha256(f)[:12]}, the manifest "
                                     f"records {want[:12]}); {_rebuild_hint(folder)}")

    def save(self, backbone: str, name: str, peft_model, adapter_name: str, head: torch.nn.Module | None,
             manifest: dict, extra: Callable[[Path], None] | None = None) -> Path | None:
        """Save one adapter of ``peft_model`` (+ head + manifest) for this seed, atomically; returns the folder.

        ``extra(folder)``, if given, writes more files into the (temporary) folder before the manifest.
        Returns None, writing nothing, when the stored adapter has the better validation
        (:func:`stored_is_better`; ``force`` replaces it).
        """
        def fill(tmp: Path) -> dict:
            peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name])
            sub = tmp / adapter_name if adapter_name != "default" else tmp
            if sub != tmp:  # peft nests non-default adapters in a sub-folder: flatten
                for f in sub.iterdir():
                    shutil.move(str(f), tmp / f.name)
                sub.rmdir()
            if head is not None:
                save_head(head, tmp / HEAD)
            if extra is not None:
                extra(tmp)
            record = {**manifest, "backbone": backbone, "name": name, "seed": self.seed,
                      "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_card(tmp, record)  # README.md (the model card), the base model's hub name (recsys/models/card.py)
            return record

        return self._write_version(self._link(backbone, name), fill)

    def adopt(self, folder: str | os.PathLike, **record) -> Path | None:
        """Copy the complete adapter ``folder`` (of another store, e.g. a search trial's) into this store under
        the backbone and name its manifest records, with ``record`` added to the manifest; returns the folder."""
        folder = Path(folder)
        manifest = {**self.load_manifest(folder), **record}

        def fill(tmp: Path) -> dict:
            shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(MANIFEST))
            return manifest

        return self._write_version(self._link(manifest["backbone"], manifest["name"]), fill)

    def _write_version(self, link: Path, fill: Callable[[Path], dict]) -> Path | None:
        """A new version of adapter ``link``: ``fill(tmp)`` writes the files into a temporary folder and returns
        the manifest, written last with the files' checksums and the data's fingerprints (it marks the folder
        complete); then swapped in atomically (:meth:`_swap_in`). None when the stored version is kept."""
        link.parent.mkdir(parents=True, exist_ok=True)
        stamp = f"{time.time_ns()}-{os.getpid()}-{socket.gethostname()}"
        tmp = link.parent / f".{link.name}.tmp-{stamp}"
        try:
            manifest = {**fill(tmp), CHECKSUMS: checksums(tmp)}
            if self.data:
                manifest[FINGERPRINT] = {d: self.data[d] for d in adapter_domains(manifest) if d in self.data}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))  # written last: marks complete
            _apply_umask(tmp)
            if not self._swap_in(link, tmp, stamp, manifest):
                return None
            self._claim()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return link

    def _swap_in(self, link: Path, tmp: Path, stamp: str, manifest: Mapping) -> bool:
        """Make ``link`` point at the complete folder ``tmp`` in one rename, under the adapter's file lock;
        remove the versions older than the one replaced and killed exports' litter. False (nothing swapped)
        when the stored adapter has the better validation and ``force`` is off."""
        prefix = f".{link.name}.v-"
        with FileLock(str(link.parent / f".{link.name}.lock")):
            clean_litter(link.parent, link.name)
            why = None if self.force else stored_is_better(_manifest_or_none(link), manifest, self.monitor)
            if why:
                log.warning("%s: %s", link, why)
                return False
            version = link.parent / f"{prefix}{stamp}"
            os.replace(tmp, version)
            previous = os.readlink(link) if link.is_symlink() else None
            if link.exists() and not link.is_symlink():  # a plain folder put there by hand: kept as a version
                os.replace(link, link.parent / f"{prefix}{stamp}-before")
                previous = f"{prefix}{stamp}-before"
            new_link = link.parent / f".{link.name}.link-{stamp}"
            os.symlink(version.name, new_link)
            os.replace(new_link, link)  # atomic: readers see the old version or the new one
            for old in link.parent.glob(f"{prefix}*"):
                if old.name not in (version.name, previous):
                    shutil.rmtree(old, ignore_errors=True)
        return True

    def _claim(self) -> None:
        """Record which data root this store folder holds adapters of (:func:`data_store`), on its first export."""
        root = self.settings.get("root")
        if root and not (self.root / COLLECTION).is_file():
            write_json(self.root / COLLECTION, {"data_root": os.path.realpath(str(root)), "collection": self.root.name})

    def data_problem(self, folder: str | os.PathLike, manifest: Mapping) -> str | None:
        """Why the adapter in ``folder`` (its ``manifest``) was trained on other data than this run reads, in
        one line naming both fingerprints (None: the same data, or a store that checks no data). An adapter
        stored before fingerprints is compared by the data settings it records (and used with a warning)."""
        if not self.data:
            return None
        recorded = manifest.get(FINGERPRINT)
        if recorded is None:
            return self._unfingerprinted(Path(folder), manifest)
        for d, fp in recorded.items():
            if d in self.data and self.data[d] != fp:
                return (f"{folder} was trained on other {d!r} data (data fingerprint {fp}) than this run reads "
                        f"(fingerprint {self.data[d]}): train it on this data, e.g. "
                        f"'{lora_command(d, self.seed)}' with this run's data settings (the export replaces it)")
        return None

    def _unfingerprinted(self, folder: Path, manifest: Mapping) -> str | None:
        data = manifest.get("data") if isinstance(manifest.get("data"), Mapping) else {}
        for d in (d for d in adapter_domains(manifest) if d in self.data):
            spec, now = (data.get("domains") or {}).get(d), (self.settings.get("domains") or {}).get(d)
            if not _same_place(data.get("root"), self.settings.get("root")) or (data and spec != now):
                return (f"{folder} was stored before adapters recorded their data (no {FINGERPRINT}) and its "
                        f"{d!r} data differs from this run's (data.root {data.get('root')!r} vs "
                        f"{self.settings.get('root')!r}, or its data.domains.{d}): train it again, "
                        f"'{lora_command(d, self.seed)}' with this run's data settings")
        log.warning("%s was stored before adapters recorded their data fingerprint; the data settings it records "
                    "match this run's, so it is used (export it again to record the fingerprint)", folder)
        return None

    @staticmethod
    def load_manifest(folder: str | os.PathLike) -> dict:
        """The manifest of a stored adapter; StoreError if the folder is incomplete or a file is broken."""
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise StoreError(f"{folder} is not a complete adapter folder (no {MANIFEST})")
        AdapterStore.verify(folder)
        return _read_json(folder / MANIFEST, folder)

    @staticmethod
    def load_head(folder: str | os.PathLike) -> dict[str, torch.Tensor] | None:
        f = Path(folder) / HEAD
        if not f.is_file():
            return None
        _check_safetensors(f, Path(folder))
        return load_file(str(f))

    @staticmethod
    def resolve(folder: str | os.PathLike, seed: int) -> Path:
        """A folder given by hand (``evaluate.py adapter=``): an adapter folder as is, or a store's
        ``<name>/`` folder, whose adapter for ``seed`` it picks (StoreError: none for that seed)."""
        folder = Path(folder)
        if (folder / CONFIG).is_file() or not folder.is_dir():
            return folder
        seeds = sorted(p.name for p in folder.glob("seed-*"))
        if not seeds:
            return folder
        if not (folder / f"seed-{seed}").exists():
            raise StoreError(f"{folder} holds adapters of {seeds}, none of seed={seed}: set seed= to one of "
                             f"them (it also fixes the candidate lists) or name the folder {folder}/{seeds[0]}")
        return (folder / f"seed-{seed}").resolve()
