"""Issue 14's faults, one test (or more) each: no run reports success it did not earn, no stored adapter
is lost or silently replaced, every user error is one clear line naming the key or file.

Numbers in the comments are the issue's items."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from recsys.pipeline import scale, stages
from recsys.data.datamodule import RecDataModule
from recsys.data.domain import DataError
from recsys.data.readers import read_plain
from recsys.core.errors import UserError
from recsys.methods.base import RunInfo
from recsys.methods.lora import LoRAModule
from recsys.methods.xcross import XCrossModule
from recsys.models.adapter_store import AdapterStore, StoreError
from recsys.models.backbone import load_backbone
from recsys.pipeline.run import best_checkpoint, evaluate, train
from conftest import compose_config, paths_under

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
REPO = Path(__file__).resolve().parents[1]
TINY = ["backbone=tiny_encoder", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=none",
        "~callbacks.rich_progress_bar", "data.max_eval_users=8", "data.batch_size=4", "data.eval_batch_size=8",
        "data.max_train_examples=32", "zero_shot=false"]
SYNTH = {"tools": {"source": "synthetic", "kind": "tools", "n_users": 40, "n_items": 60}}


def config(out: Path, *overrides: str, name: str = "train"):
    return compose_config(name, *paths_under(out, out.parent / "store", out.parent / "cache"), *overrides)


def export_lora(store: AdapterStore, domain: str) -> Path:
    """A random tiny-encoder LoRA + head exported as ``domain`` (what method=lora writes)."""
    torch.manual_seed(len(domain))
    return LoRAModule(load_backbone("tiny:encoder")).export(store, {"domain": domain, "method": "lora"})


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1. sizes and zero steps
@pytest.mark.parametrize("key,value", [("batch_size", -4), ("batch_size", 0), ("eval_batch_size", 0),
                                       ("max_train_examples", 0), ("max_train_examples", -3),
                                       ("max_eval_users", 0), ("max_eval_users", -1)])
def test_bad_sizes_fail_at_construction(key, value):
    with pytest.raises(DataError, match=f"data.{key}={value}"):
        RecDataModule.from_config(domains=SYNTH, target="tools", **{key: value})


def test_a_run_without_an_optimizer_step_fails_and_exports_nothing(tmp_path):
    store = AdapterStore(tmp_path / "store")
    good = export_lora(store, "tools")
    before = tree(good)
    cfg = config(tmp_path / "run", *TINY, "trainer.limit_train_batches=0")
    with pytest.raises(UserError, match="no optimizer step"):
        train(cfg)
    assert tree(store.path("tiny:encoder", "tools")) == before  # the good adapter is untouched
    assert not (tmp_path / "run" / "metrics.json").exists()


def provide_sources(store):
    """X-Cross's source adapters as the pipeline finds them before building the module (recsys.pipeline.stages)."""
    run = RunInfo(target="tools", sources=("toys", "sports"), store=store)
    specs = XCrossModule.required_adapters(run, load_backbone("tiny:encoder"))
    return stages.provide(None, specs, "tiny:encoder", store, False, train)[0]


# ------------------------------------------------------------------------------ 2. complete or absent
def test_a_stored_adapter_without_its_head_does_not_exist(tmp_path):
    store = AdapterStore(tmp_path / "store")
    for d in ("toys", "sports"):
        export_lora(store, d)
    folder = store.path("tiny:encoder", "sports")
    (folder / "head.safetensors").unlink()
    assert store.exists("tiny:encoder", "toys") and not store.exists("tiny:encoder", "sports")
    with pytest.raises(UserError) as e:
        provide_sources(store)
    assert str(folder) in str(e.value) and "head.safetensors" in str(e.value)


# ------------------------------------------------------------------------------ 3. training time
def test_train_time_survives_a_restart(monkeypatch):
    clock = iter([100.0, 105.0, 200.0, 202.0])
    monkeypatch.setattr(scale.time, "monotonic", lambda: next(clock))
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(_combined_loader_states_to_load=None, _combined_loader=None))
    first = scale.ResumeState()
    first.on_train_start(trainer, None)  # t=100
    state = first.state_dict()  # a checkpoint at t=105: 5 s trained, then the process is killed
    again = scale.ResumeState()  # the restarted process
    again.load_state_dict(state)
    again.on_train_start(trainer, None)  # t=200
    again.on_train_end(trainer, None)  # t=202
    assert again.train_seconds() == pytest.approx(7.0)


def test_a_finished_run_started_again_changes_nothing(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, *TINY)
    _, first = train(cfg)
    files = {p: p.read_bytes() for p in (out / "metrics.json", out / "run.json")}
    store = tree(tmp_path / "store")
    _, again = train(config(out, *TINY))
    assert again == first and again["time/train_s"] > 0
    assert {p: p.read_bytes() for p in files} == files and tree(tmp_path / "store") == store


# ------------------------------------------------------------------------------ 4. concurrent exports
class _FakePeft:
    """What AdapterStore.save needs of a peft model: ``save_pretrained`` writing an adapter's two files."""

    def __init__(self, value: float):
        self.value = value

    def save_pretrained(self, path, selected_adapters):
        os.makedirs(path, exist_ok=True)
        Path(path, "adapter_config.json").write_text(json.dumps({"r": 8, "value": self.value}))
        save_file({"w": torch.full((64,), self.value)}, os.path.join(path, "adapter_model.safetensors"))


def _export_many(root: str, value: float, n: int, errors) -> None:
    store = AdapterStore(root)
    try:
        for _ in range(n):
            store.save("tiny:encoder", "tools", _FakePeft(value), "default", None, {"scoring": "likelihood"})
    except Exception as e:  # noqa: BLE001 - reported to the test
        errors.put(f"{type(e).__name__}: {e}")


def test_concurrent_exports_lose_nothing_and_readers_always_see_one(tmp_path):
    store = AdapterStore(tmp_path / "store")
    store.save("tiny:encoder", "tools", _FakePeft(0.0), "default", None, {"scoring": "likelihood"})
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_export_many, args=(str(store.root), v, 15, errors)) for v in (1.0, 2.0)]
    seen, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            seen.append(store.exists("tiny:encoder", "tools"))

    reader = threading.Thread(target=read)
    reader.start()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    reader.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert errors.empty(), errors.get()
    assert seen and all(seen), f"a reader saw no adapter {seen.count(False)} times of {len(seen)}"
    value = json.loads((store.path("tiny:encoder", "tools") / "adapter_config.json").read_text())["value"]
    assert value in (1.0, 2.0)
    versions = [p for p in store.path("tiny:encoder", "tools").parent.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) <= 2  # the current one and the one it replaced


def test_a_reader_whose_version_is_removed_while_it_looks_reads_the_new_one(tmp_path, monkeypatch):
    """A reader resolves the current version, then (a loaded machine) two exports replace it and start
    removing it: the half-removed folder it looks at is not the store's answer; it looks again at the version
    the link now names. Before: "incomplete", so ``exists`` was False while an adapter was stored."""
    store = AdapterStore(tmp_path / "store")
    store.save("tiny:encoder", "tools", _FakePeft(0.0), "default", None, {"scoring": "likelihood"})
    first = store.path("tiny:encoder", "tools")
    real, calls = AdapterStore.missing_files, []

    def racing(folder):
        if not calls:  # during the first look: the next export lands and the looked-at version is half removed
            store.save("tiny:encoder", "tools", _FakePeft(1.0), "default", None, {"scoring": "likelihood"})
            (Path(folder) / "adapter_config.json").unlink()
        calls.append(Path(folder))
        return real(folder)

    monkeypatch.setattr(AdapterStore, "missing_files", staticmethod(racing))
    assert store.problem("tiny:encoder", "tools") == ""
    assert calls == [first, store.path("tiny:encoder", "tools")] and calls[1] != first
    # a current version that really lacks a file is still reported, naming it
    (store.path("tiny:encoder", "tools") / "adapter_config.json").unlink()
    assert store.problem("tiny:encoder", "tools").endswith("is incomplete (lacks adapter_config.json)")


# ------------------------------------------------------------------------------ 5. one adapter per seed
def test_each_seed_keeps_its_adapter(tmp_path):
    seeds = {s: AdapterStore(tmp_path / "store", seed=s) for s in (0, 1)}
    for s, store in seeds.items():
        store.save("tiny:encoder", "toys", _FakePeft(float(s)), "default", None, {"scoring": "likelihood", "seed": s})
    for s, store in seeds.items():
        folder = store.path("tiny:encoder", "toys")
        assert json.loads((folder / "adapter_config.json").read_text())["value"] == float(s)
        assert store.load_manifest(folder)["seed"] == s
    assert not AdapterStore(tmp_path / "store", seed=2).exists("tiny:encoder", "toys")


def test_an_adapter_of_the_old_layout_serves_its_own_seed_only(tmp_path):
    store = AdapterStore(tmp_path / "store", seed=1)
    store.save("tiny:encoder", "toys", _FakePeft(1.0), "default", None, {"scoring": "likelihood"})
    old = tmp_path / "store" / "tiny-encoder" / "toys"
    for f in store.path("tiny:encoder", "toys").iterdir():  # the files straight in <name>/, as stored before
        shutil.copy(f, old / f.name)
    shutil.rmtree(store.path("tiny:encoder", "toys"))
    (old / "seed-1").unlink()
    assert store.exists("tiny:encoder", "toys") and store.path("tiny:encoder", "toys") == old
    assert not AdapterStore(tmp_path / "store", seed=0).exists("tiny:encoder", "toys")
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "seed"}))
    with pytest.raises(StoreError, match="records no seed"):
        store.exists("tiny:encoder", "toys")


def test_evaluate_adapter_folder_picks_the_runs_seed(tmp_path):
    for s in (0, 1):
        AdapterStore(tmp_path / "store", seed=s).save("tiny:encoder", "toys", _FakePeft(float(s)), "default", None,
                                                      {"scoring": "likelihood"})
    name = tmp_path / "store" / "tiny-encoder" / "toys"
    assert json.loads((AdapterStore.resolve(name, 1) / "adapter_config.json").read_text())["value"] == 1.0
    with pytest.raises(StoreError, match="none of seed=2"):
        AdapterStore.resolve(name, 2)


# ------------------------------------------------------------------------------ 6. umask
def test_stored_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = AdapterStore(tmp_path / "store").save("tiny:encoder", "toys", _FakePeft(0.0), "default", None,
                                                       {"scoring": "likelihood"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.resolve().iterdir()}
    assert modes["adapter_model.safetensors"] == 0o644 and modes["manifest.json"] == 0o644, modes
    assert folder.resolve().stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------ 7. one line, before the backbone
def test_a_user_error_is_one_line_before_the_backbone_loads(tmp_path):
    """A bad data size and an unknown backbone: the data error comes first (nothing heavy has loaded), as one
    line without a traceback, exit status 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, "train.py", "backbone.name=embedded:nope", "data.batch_size=0", "logger=none",
                        f"hydra.run.dir={tmp_path}/run", f"paths.adapter_store={tmp_path}/store"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "error: " in line]
    assert len(errors) == 1 and "data.batch_size=0 must be >= 1" in errors[0], text[-3000:]
    assert "Traceback" not in text and "embedded:nope" not in text


# ------------------------------------------------------------------------------ 8. broken files named
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "head.safetensors", "adapter_config.json"])
def test_a_broken_stored_file_is_named(tmp_path, name):
    store = AdapterStore(tmp_path / "store")
    for d in ("toys", "sports"):
        export_lora(store, d)
    f = store.path("tiny:encoder", "toys") / name
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(UserError) as e:
        provide_sources(store)
    assert str(f) in str(e.value) and "rebuild" in str(e.value)


def test_a_truncated_checkpoint_is_named(tmp_path):
    ckpt = tmp_path / "epoch00.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "loops": {}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1500])
    with pytest.raises(UserError, match=str(ckpt)):
        evaluate(config(tmp_path / "eval", "backbone=tiny_encoder", f"ckpt_path={ckpt}", name="eval"))


# ------------------------------------------------------------------------------ 9. plain-format diagnoses
def _plain(folder: Path, sequences: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps({"item_id": f"i{k}", "title": f"T {k}"}) + "\n"
                                                for k in range(5)))
    (folder / "sequences.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sequences))
    return folder


def test_empty_sequences_name_the_file(tmp_path):
    folder = _plain(tmp_path / "d", [])
    with pytest.raises(DataError) as e:
        read_plain(folder)
    assert str(folder / "sequences.jsonl") in str(e.value) and "k-core" not in str(e.value)


def test_unknown_ids_are_counted(tmp_path):
    folder = _plain(tmp_path / "d", [{"user_id": f"u{u}", "item_ids": ["x1", "x2", "x3", "i0"]} for u in range(4)])
    with pytest.raises(DataError) as e:
        read_plain(folder)
    msg = str(e.value)
    assert str(folder / "sequences.jsonl") in msg and "12 are not in items.jsonl" in msg and "of 16 item ids" in msg
    assert "k-core" not in msg


# ------------------------------------------------------------------------------ 10. copied run folders
def test_a_copied_run_folder_scores_its_own_checkpoint(tmp_path):
    original = tmp_path / "original"
    (original / "checkpoints").mkdir(parents=True)
    (original / "checkpoints" / "epoch01.ckpt").write_bytes(b"original")
    (original / "run.json").write_text(json.dumps({"best_checkpoint": str(original / "checkpoints" / "epoch01.ckpt")}))
    copy = Path(shutil.copytree(original, tmp_path / "copy"))
    assert best_checkpoint(copy) == copy / "checkpoints" / "epoch01.ckpt"
    (copy / "checkpoints" / "epoch01.ckpt").unlink()
    with pytest.raises(UserError, match=str(copy / "checkpoints" / "epoch01.ckpt")):
        best_checkpoint(copy)


# ------------------------------------------------------------------------------ 11. weights_only
def _payload(flag: str) -> None:
    """What a malicious checkpoint would run while being unpickled."""
    Path(flag).write_text("ran")


class _Callable:
    def __init__(self, flag: str):
        self.flag = flag

    def __reduce__(self):
        return (_payload, (self.flag,))


def test_a_checkpoint_holding_a_callable_is_refused(tmp_path):
    flag = tmp_path / "ran.txt"
    (tmp_path / "checkpoints").mkdir()
    bad = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "loops": {}, "x": _Callable(str(flag))}, bad)
    assert scale.resume_checkpoint(tmp_path) is None  # skipped, not run
    with pytest.raises(UserError, match="refused"):
        scale.load_checkpoint(bad)
    assert not flag.exists()
    sources = [p for p in (REPO / "recsys").rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not sources, sources
