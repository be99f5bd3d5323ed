"""Issue 21, items 3 and 5 (and the bad trials 1 and 6): a moved run folder resumes with the same model
selection, every output is written through the atomic writer without following a planted link, a full disk
leaves the previous checkpoint, and broken inputs are one-line errors naming the file and the fix."""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recsys.core.errors import UserError
from recsys.core.files import write_text
from recsys.pipeline import scale
from recsys.pipeline.run import train

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`", "ignore:The dirpath has changed")
REPO = Path(__file__).resolve().parents[1]
# lr 0.5: epoch 1 validates worse than epoch 0, so model selection must keep epoch 0 across the restart
TWO_EPOCHS = ["backbone=tiny_encoder", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "logger=none",
              "~callbacks.rich_progress_bar", "data.max_eval_users=16", "data.batch_size=4", "data.eval_batch_size=8",
              "data.max_train_examples=32", "zero_shot=false", "export_adapter=false", "recipe.optimizer.lr=0.5"]


def config(out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"paths.adapter_store={out.parent / 'store'}",
                                           f"paths.cache_dir={out.parent / 'cache'}", *overrides])


class Killed(RuntimeError):
    pass


# ------------------------------------------------------------------------------ bad trial 1: a moved folder
def test_a_moved_run_folder_resumes_with_the_same_model_selection(tmp_path, monkeypatch):
    """Killed after epoch 1 of 2, the folder moved, started again from the new place: metrics.json equals the
    uninterrupted run's (the val metrics of the selected epoch beside the test metrics of that epoch's model).
    Lightning's ModelCheckpoint forgot the best score on a changed dirpath and selected epoch 2."""
    _, whole = train(config(tmp_path / "whole", *TWO_EPOCHS))
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["best_checkpoint"].endswith("epoch00.ckpt")

    def kill(self, trainer, module):
        if trainer.current_epoch == 1:
            raise Killed("killed after the first epoch")

    with monkeypatch.context() as m:
        m.setattr(scale.ResumeState, "on_train_epoch_start", kill, raising=False)
        with pytest.raises(Killed):
            train(config(tmp_path / "scratch", *TWO_EPOCHS))
    assert (tmp_path / "scratch" / "checkpoints" / "last.ckpt").is_file()
    shutil.move(tmp_path / "scratch", tmp_path / "moved")
    _, resumed = train(config(tmp_path / "moved", *TWO_EPOCHS))
    keys = sorted(k for k in whole if k.startswith(("val/", "test/", "params/")))
    assert len(keys) > 10 and {k: resumed.get(k) for k in keys} == {k: whole[k] for k in keys}
    best = json.loads((tmp_path / "moved" / "run.json").read_text())["best_checkpoint"]
    assert best == str(tmp_path / "moved" / "checkpoints" / "epoch00.ckpt")


def test_checkpoint_state_is_rebased_onto_the_moved_folder(tmp_path):
    old, new = str(tmp_path / "a" / "checkpoints"), str(tmp_path / "b" / "checkpoints")
    saved = {"monitor": "val/ndcg@10", "best_model_score": torch.tensor(0.4), "best_model_path": f"{old}/epoch00.ckpt",
             "current_score": torch.tensor(0.3), "dirpath": old, "best_k_models": {f"{old}/epoch00.ckpt": torch.tensor(0.4)},
             "kth_best_model_path": f"{old}/epoch00.ckpt", "kth_value": torch.tensor(0.4),
             "last_model_path": f"{old}/last.ckpt"}
    cb = scale.RunCheckpoint(dirpath=new, monitor="val/ndcg@10", mode="max")
    cb.load_state_dict(saved)  # another run's checkpoint (ckpt_path=): its best file is not here, selection afresh
    assert cb.best_model_score is None
    Path(new).mkdir(parents=True)
    (Path(new) / "epoch00.ckpt").write_bytes(b"")  # the folder moved with its checkpoints
    cb = scale.RunCheckpoint(dirpath=new, monitor="val/ndcg@10", mode="max")
    cb.load_state_dict(saved)
    assert float(cb.best_model_score) == pytest.approx(0.4) and cb.best_model_path == f"{new}/epoch00.ckpt"
    assert list(cb.best_k_models) == [f"{new}/epoch00.ckpt"] and cb.last_model_path == f"{new}/last.ckpt"
    assert cb.state_key.startswith("ModelCheckpoint{")  # checkpoints written before this class still restore


# ------------------------------------------------------------------------------ bad trial 6: planted links
def plant_link(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder whose results.txt is a link to a file outside it: (the run folder, that file)."""
    outside, run = tmp_path / "precious.txt", tmp_path / "run"
    outside.write_text("keep me")
    run.mkdir()
    (run / "results.txt").symlink_to(outside)
    return run, outside


def test_outputs_replace_a_planted_symlink_instead_of_writing_through_it(tmp_path):
    run, outside = plant_link(tmp_path)
    write_text(run / "results.txt", "table")
    assert outside.read_text() == "keep me"
    assert not (run / "results.txt").is_symlink() and (run / "results.txt").read_text() == "table"
    assert [p.name for p in run.iterdir()] == ["results.txt"]  # no temp file left


def test_a_finished_run_does_not_follow_a_link_planted_in_its_folder(tmp_path):
    out, outside = plant_link(tmp_path)
    train(config(out, *TWO_EPOCHS, "trainer.max_epochs=1"))
    assert outside.read_text() == "keep me" and "model" in (out / "results.txt").read_text()


# ------------------------------------------------------------------------------ a disk that fills
def _full_disk(monkeypatch, folder: Path):
    """Writes into ``folder`` fail with ENOSPC after half their bytes, as on a disk that fills; elsewhere (a
    temp folder on another device, memory) they succeed. Covers both writers: a file opened here, and a file
    moved here from elsewhere (shutil.move across devices copies into the target)."""
    real_open, real_move = builtins.open, shutil.move

    class Half:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[: max(1, len(data) // 2)])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def inside(path) -> bool:
        return Path(os.path.abspath(path)).is_relative_to(folder)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return Half(f) if isinstance(file, (str, os.PathLike)) and "w" in mode and inside(file) else f

    def move(src, dst, *args, **kwargs):
        if not inside(dst):
            return real_move(src, dst, *args, **kwargs)
        with real_open(src, "rb") as s, real_open(dst, "wb") as d:
            d.write(s.read()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(shutil, "move", move)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    """The run's trainer writes a checkpoint over a good last.ckpt while the disk fills."""
    from recsys.pipeline.run import build_trainer

    folder = (tmp_path / "run" / "checkpoints").resolve()
    folder.mkdir(parents=True)
    trainer = build_trainer(config(tmp_path / "run", *TWO_EPOCHS))
    good = {"state_dict": {"w": torch.ones(2000)}, "epoch": 0}
    trainer.strategy.checkpoint_io.save_checkpoint(good, folder / "last.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    _full_disk(monkeypatch, folder)
    with pytest.raises(UserError) as e:
        trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": {"w": torch.zeros(4000)}}, folder / "last.ckpt")
    monkeypatch.undo()
    assert (folder / "last.ckpt").read_bytes() == before  # not truncated
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]  # no temp file left
    msg = str(e.value)
    assert "\n" not in msg and "last.ckpt" in msg and "No space left" in msg and "same command" in msg


def test_the_run_trainer_writes_checkpoints_atomically(tmp_path):
    from recsys.pipeline.run import build_trainer

    trainer = build_trainer(config(tmp_path / "run", *TWO_EPOCHS))
    assert isinstance(trainer.strategy.checkpoint_io, scale.AtomicCheckpointIO)


# ------------------------------------------------------------------------------ one-line errors
def test_random_bytes_as_a_checkpoint_are_not_called_code(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(UserError) as e:
        scale.load_checkpoint(ckpt)
    msg = str(e.value)
    assert str(ckpt) in msg and "not a checkpoint" in msg and "code" not in msg and "\n" not in msg


def test_a_read_only_run_folder_is_found_before_training(tmp_path, monkeypatch):
    from recsys.core import files

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: a read-only mount, as access(2) reports it
            real = os.access
            monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
        with pytest.raises(UserError, match="hydra.run.dir") as e:
            train(config(ro / "run", *TWO_EPOCHS))
        assert "\n" not in str(e.value) and str(ro) in str(e.value)
        with pytest.raises(UserError, match="paths.adapter_store") as e:
            train(config(tmp_path / "run", *TWO_EPOCHS, "export_adapter=true", f"paths.adapter_store={ro}/store"))
        assert "\n" not in str(e.value) and not (tmp_path / "run" / "checkpoints").exists()  # before training
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("name", ["run.json", "checkpoints/config.json"])
def test_a_non_json_run_record_is_one_line(tmp_path, name):
    out = tmp_path / "run"
    train(config(out, *TWO_EPOCHS, "trainer.max_epochs=1"))
    (out / name).write_bytes(b"\x00\x01 not json")
    with pytest.raises(UserError) as e:
        train(config(out, *TWO_EPOCHS, "trainer.max_epochs=1"))
    assert str(out / name) in str(e.value) and "JSON" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", ["gzip", "no-domain", "cut"])
def test_a_malformed_retrieved_npz_is_one_line(tmp_path, content):
    from recsys.data import retrieval
    from recsys.data.domain import Domain

    run = tmp_path / "retriever"
    run.mkdir()
    path = run / "retrieved.npz"
    np.savez(path, **{"val/users": np.asarray(["u0"]), "val/items": np.asarray([["i0"]])})
    if content == "gzip":
        path.write_bytes(gzip.compress(b"not a zip"))
    elif content == "cut":
        np.savez(path, domain=np.asarray("tools"), **{"val/users": np.asarray(["u0"] * 500)})
        path.write_bytes(path.read_bytes()[:300])
    domain = Domain("tools", ["i0"], ["a title"], ["u0"], [[0, 0, 0]])
    with pytest.raises(UserError) as e:
        retrieval.load_retrieved(run, domain, "val")
    assert str(path) in str(e.value) and "evaluate.py" in str(e.value) and "\n" not in str(e.value)
