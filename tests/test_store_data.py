"""Issue 21, item 1 (and the bad trials 3 and 5): adapters that know their data. The store keys adapters by
the data root they were trained on and records the data's fingerprint and each file's sha256; a reader of
other data, or of a file changed in place, is refused in one line; an export never replaces a better stored
adapter of the same data (``export_adapter=force`` does) nor stores a collapsed run; names are plain; killed
exports' litter goes with the next export."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file, save_file

from recsys.methods.base import RecModule
from recsys.models.adapter_store import AdapterSpec, AdapterStore, StoreError, data_store
from recsys.pipeline import stages
from recsys.pipeline.run import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
REPO = Path(__file__).resolve().parents[1]
TINY = ["backbone=tiny_encoder", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=none",
        "~callbacks.rich_progress_bar", "data.max_eval_users=8", "data.batch_size=4", "data.eval_batch_size=8",
        "data.max_train_examples=32", "zero_shot=false", "data.num_negatives=9", "data.max_history=3",
        "export_adapter=force"]  # two steps leave a tiny model at chance: stored only by force
BACKBONE = "tiny:encoder"


def plain_root(root: Path, seed: int, domain: str = "beauty") -> Path:
    """A data root holding one plain-format domain of 30 users x 8 of 40 items (seeded)."""
    rng = np.random.default_rng(seed)
    folder = root / domain
    folder.mkdir(parents=True)
    (folder / "items.jsonl").write_text("".join(json.dumps({"item_id": f"i{k}", "title": f"item {k} of {seed}"}) + "\n"
                                                for k in range(40)))
    (folder / "sequences.jsonl").write_text("".join(
        json.dumps({"user_id": f"u{u}", "item_ids": [f"i{k}" for k in rng.permutation(40)[:8]]}) + "\n"
        for u in range(30)))
    return root


def config(out: Path, store: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"paths.adapter_store={store}",
                                           f"paths.cache_dir={out.parent / 'cache'}", *TINY, *overrides])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakePeft:
    """What AdapterStore.save needs of a peft model: ``save_pretrained`` writing an adapter's two files."""

    def __init__(self, value: float = 1.0):
        self.value = value

    def save_pretrained(self, path, selected_adapters):
        os.makedirs(path, exist_ok=True)
        Path(path, "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q"]}))
        save_file({"w": torch.full((64,), self.value)}, os.path.join(path, "adapter_model.safetensors"))


def export(store: AdapterStore, value: float = 1.0, name: str = "tools", val: float | None = None, **manifest):
    metrics = {} if val is None else {"val/ndcg@10": val}
    return store.save(BACKBONE, name, FakePeft(value), "default", None,
                      {"domain": name, "method": "lora", "scoring": "likelihood", "metrics": metrics, **manifest})


def lookup(store: AdapterStore, name: str = "tools"):
    return stages.lookup(store, BACKBONE, AdapterSpec(name, expect={"backbone": BACKBONE}))


# ------------------------------------------------------------------------------ bad trial 3: same name, other data
def test_a_users_own_domain_named_like_a_shared_one_never_replaces_its_adapter(tmp_path):
    """``data=amazon`` with the user's own ``data.root`` used to default to the shared domains' store: the
    user's ``beauty`` replaced the shared ``beauty`` adapter and X-Cross fused it without a word."""
    shared, own, store = plain_root(tmp_path / "shared", 0), plain_root(tmp_path / "own", 1), tmp_path / "amazon"
    cfg_shared = config(tmp_path / "run-shared", store, "data=amazon", f"data.root={shared}", "data.target=beauty")
    train(cfg_shared)
    stored = AdapterStore(store).path(BACKBONE, "beauty")
    before = tree(stored)
    train(config(tmp_path / "run-own", store, "data=amazon", f"data.root={own}", "data.target=beauty"))
    assert tree(AdapterStore(store).path(BACKBONE, "beauty")) == before  # the shared adapter is untouched
    own_store = data_store(store, str(own))
    assert own_store != store and AdapterStore(own_store).exists(BACKBONE, "beauty")
    fp = [json.loads((AdapterStore(s).path(BACKBONE, "beauty") / "manifest.json").read_text())["data_fingerprint"]
          for s in (store, own_store)]
    assert fp[0]["beauty"] != fp[1]["beauty"]
    assert data_store(store, str(shared)) == store  # the shared data's runs still find their adapters


# ------------------------------------------------------------------------------ a reader of other data
def test_a_reader_of_other_data_is_refused_in_one_line_naming_both(tmp_path):
    export(AdapterStore(tmp_path, data={"tools": "a" * 16}))
    assert lookup(AdapterStore(tmp_path, data={"tools": "a" * 16, "toys": "c" * 16}))[0] is not None
    with pytest.raises(StoreError) as e:
        lookup(AdapterStore(tmp_path, data={"tools": "b" * 16}))
    msg = str(e.value)
    assert "a" * 16 in msg and "b" * 16 in msg and "'tools'" in msg and "\n" not in msg and "train.py" in msg


def test_an_adapter_stored_before_fingerprints_is_used_only_for_the_same_data_settings(tmp_path, caplog):
    settings = {"root": str(tmp_path / "data"), "domains": {}}
    folder = export(AdapterStore(tmp_path / "store"), data=settings)  # as older code stored it: no fingerprint
    assert "data_fingerprint" not in json.loads((folder / "manifest.json").read_text())
    with caplog.at_level(logging.WARNING, logger="recsys"):
        assert lookup(AdapterStore(tmp_path / "store", data={"tools": "f" * 16}, settings=settings))[0] is not None
    assert "before adapters recorded their data fingerprint" in caplog.text
    other = {**settings, "root": str(tmp_path / "elsewhere")}
    with pytest.raises(StoreError, match="no data_fingerprint") as e:
        lookup(AdapterStore(tmp_path / "store", data={"tools": "f" * 16}, settings=other))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ bad trial 5: a file changed in place
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_file_changed_in_place_but_still_valid_is_refused(tmp_path, name):
    folder = export(AdapterStore(tmp_path))
    f = folder / name
    if name.endswith(".safetensors"):
        tensors = load_file(str(f))
        tensors["w"][0] += 1.0
        save_file(tensors, str(f))  # still valid safetensors, same size
    else:
        f.write_text(f.read_text().replace("8", "9"))
    with pytest.raises(StoreError) as e:
        AdapterStore.verify(folder)
    assert str(f) in str(e.value) and "changed since it was exported" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError):
        lookup(AdapterStore(tmp_path))


# ------------------------------------------------------------------------------ exports never worse
def test_an_export_keeps_a_stored_adapter_of_better_validation_unless_forced(tmp_path):
    data = {"tools": "a" * 16}
    store = AdapterStore(tmp_path, data=data)
    good = export(store, 1.0, val=0.5)
    before = tree(good)
    assert export(store, 2.0, val=0.3) is None  # worse: kept the stored one
    assert tree(store.path(BACKBONE, "tools")) == before
    assert export(AdapterStore(tmp_path, data={"tools": "b" * 16}), 3.0, val=0.1) is not None  # other data: replaced
    export(store, 4.0, val=0.4)
    assert export(AdapterStore(tmp_path, data=data, force=True), 5.0, val=0.2) is not None  # forced
    assert load_file(str(store.path(BACKBONE, "tools") / "adapter_model.safetensors"))["w"][0] == 5.0
    assert export(store, 6.0, val=0.9) is not None  # better: replaces


def test_a_collapsed_run_exports_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(RecModule, "training_health", lambda self: {"train/collapsed": 1.0})
    _, metrics = train(config(tmp_path / "run", tmp_path / "store", "export_adapter=true"))
    assert metrics["train/collapsed"] == 1.0
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))


def test_export_adapter_takes_true_false_or_force(tmp_path):
    from recsys.core.errors import UserError

    with pytest.raises(UserError, match="export_adapter='foo': use true, false or force"):
        train(config(tmp_path / "run", tmp_path / "store", "export_adapter=foo"))


# ------------------------------------------------------------------------------ names and litter
@pytest.mark.parametrize("name", ["../evil", "a/../../evil", ".hidden", "", "x\\y"])
def test_a_domain_name_is_a_plain_name(tmp_path, name):
    with pytest.raises(StoreError, match="not a plain name"):
        export(AdapterStore(tmp_path / "store"), name=name)
    assert not (tmp_path / "evil").exists() and not any(tmp_path.rglob("manifest.json"))


def test_the_next_export_cleans_what_killed_exports_left(tmp_path):
    store = AdapterStore(tmp_path)
    folder = export(store).parent  # <store>/<backbone>/tools
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    litter = folder / f".seed-0.tmp-1-{dead.pid}-{host}"
    alive = folder / f".seed-0.tmp-2-{os.getpid()}-{host}"  # an export under way in this process: kept
    for d in (litter, alive):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    (folder / ".seed-0.link-3").symlink_to(".seed-0.v-gone")
    export(store, 2.0)
    assert not litter.exists() and alive.exists() and not (folder / ".seed-0.link-3").is_symlink()


def test_xcross_refuses_source_folders_given_by_hand_of_other_data(tmp_path):
    from recsys.methods.base import RunInfo
    from recsys.methods.xcross import SourceAdapterError, XCrossModule

    folders = {d: str(export(AdapterStore(tmp_path, data={d: "a" * 16}), name=d)) for d in ("tools", "toys")}
    run = RunInfo(target="sports", sources=("tools", "toys"),
                  store=AdapterStore(tmp_path, data={"tools": "b" * 16, "toys": "a" * 16}))
    with pytest.raises(SourceAdapterError, match="b" * 16):
        XCrossModule.from_config(None, run, adapters=folders)  # before any backbone is needed
