"""The pipeline's stages across processes and loggers: a missing source adapter is trained once however
many ranks and jobs need it (the others wait, then read it), and each training is a wandb run of its own.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import save_file

from recsys.models.adapter_store import AdapterSpec, AdapterStore
from wandb_files import config_of, history_keys, of_type, summary_of, wandb_records

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TINY = ["backbone=tiny_encoder", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.precision=32-true",
        "~callbacks.rich_progress_bar", "data.max_eval_users=8", "data.batch_size=4", "data.eval_batch_size=8",
        "data.max_train_examples=64"]
XCROSS = ["method=xcross", "data.target=tools", "data.sources=[toys,sports]", "method.module.train_missing=true",
          "export_adapter=force"]  # tiny runs stay at chance: a collapsed run is stored only when forced


def config(out: Path, store: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"paths.adapter_store={store}",
                                           f"paths.cache_dir={out.parent}/cache", *TINY, *overrides])


# ---------------------------------------------------------------------------------------------- one training
def fake_train(calls: Path, store: Path):
    """A stand-in for ``run.train`` on a source: records the call, takes a second, stores a complete adapter."""
    def train(sub):
        with calls.open("a") as f:
            f.write(f"{sub.data.target} {sub.trainer.devices} {sub.job_type}\n")
        time.sleep(1.0)
        folder = AdapterStore(store).backbone_dir("tiny:encoder") / sub.data.target / "seed-0"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        save_file({"w": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))
        save_file({"w": torch.zeros(1)}, str(folder / "head.safetensors"))
        (folder / "manifest.json").write_text(json.dumps({"backbone": "tiny:encoder", "seed": 0}))
    return train


def provide_as(rank: int, out: Path, store: Path, calls: Path, result: Path) -> None:
    """One process of a job (``rank``) asking for the source adapter ``toys`` with ``train_missing``."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from recsys.pipeline import stages

    rank_zero_only.rank = rank
    cfg = config(out, store, *XCROSS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    found, _ = stages.provide(cfg, [AdapterSpec("toys", expect={"backbone": "tiny:encoder"})], "tiny:encoder",
                              AdapterStore(store), True, fake_train(calls, store))
    result.write_text(str(found["toys"]))


@pytest.mark.slow
def test_a_missing_adapter_is_trained_once_by_two_jobs_of_two_ranks(tmp_path):
    """Job A (ranks 0 and 1) and job B (ranks 0 and 1) need the missing adapter ``toys`` at once: one rank 0
    trains it (on one process), the other rank 0 waits on its lock, the ranks 1 wait for it; all four read
    the same folder."""
    store, calls = tmp_path / "store", tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=provide_as, args=(rank, tmp_path / job, store, calls, tmp_path / f"{job}{rank}"))
             for job in ("a", "b") for rank in (1, 0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert calls.read_text() == "toys 1 source-adapter\n"  # once, on one process, as a source-adapter run
    folders = {(tmp_path / f"{job}{rank}").read_text() for job in ("a", "b") for rank in (0, 1)}
    assert folders == {str(AdapterStore(store).path("tiny:encoder", "toys"))}


def test_a_waiting_rank_stops_when_rank_0_failed(tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from recsys.models.adapter_store import SourceAdapterError
    from recsys.pipeline import stages

    cfg = config(tmp_path / "run", tmp_path / "store", *XCROSS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / stages.STAGE_FAILED).write_text("{}")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(SourceAdapterError, match="rank 0 failed to train the source adapters"):
        stages.train_missing_once(cfg, [AdapterSpec("toys")], "tiny:encoder", AdapterStore(tmp_path / "store"),
                                  lambda sub: None, poll_s=0.01)


# ---------------------------------------------------------------------------------------------- wandb
@pytest.mark.slow
def test_train_missing_logs_each_training_as_a_wandb_run_of_its_own(tmp_path):
    """X-Cross with both sources missing and logger=wandb: three runs (two source adapters, X-Cross), each in
    its own folder, the sources in X-Cross's group with job type source-adapter, X-Cross's config naming the
    sources' adapters as its inputs. Before: one run, named after the first source, X-Cross's config over it."""
    from recsys.pipeline.run import train
    from recsys.pipeline.tracking import finish_run

    out = tmp_path / "run"
    try:
        _, metrics = train(config(out, tmp_path / "store", *XCROSS, "logger=wandb", "zero_shot=false",
                                  "trainer.max_epochs=2", "trainer.log_every_n_steps=1"))
    finally:
        finish_run()
    records = {name: wandb_records(folder) for name, folder in  # one run a folder (asserted)
               [("toys", out / "sources" / "toys"), ("sports", out / "sources" / "sports"), ("xcross", out)]}
    infos = {name: of_type(r, "run")[0] for name, r in records.items()}
    assert len({i.run_id for i in infos.values()}) == 3
    configs = {name: config_of(r) for name, r in records.items()}
    for s in ("toys", "sports"):
        assert configs[s]["method"]["name"] == "lora" and configs[s]["data"]["target"] == s
        assert (infos[s].run_group, infos[s].job_type) == ("xcross-tools", "source-adapter")
        assert infos[s].display_name == f"xcross-tools-s0-source-{s}"
        (art,) = [a for a in of_type(records[s], "artifact") if a.type == "model"]  # the lineage's start
        assert art.name == f"synthetic-tiny-encoder-{s}"
    assert (infos["xcross"].run_group, infos["xcross"].job_type) == ("xcross-tools", "train")
    assert configs["xcross"]["method"]["name"] == "xcross" and configs["xcross"]["job_type"] == "train"
    assert configs["xcross"]["lineage/inputs"] == ["synthetic-tiny-encoder-toys", "synthetic-tiny-encoder-sports"]
    # the dashboard: LR curves by parameter group; the summary holds the best validation value, its epoch and
    # the test metrics of that checkpoint
    assert {"lr/integrators", "lr/w", "lr/head"} <= history_keys(records["xcross"])
    summary = summary_of(records["xcross"])
    assert summary["val/ndcg@10"]["max"] == metrics["val/ndcg@10"] == summary["best/val/ndcg@10"]
    assert summary["best/epoch"] == metrics["train/best_epoch"] in (0, 1)
    assert summary["best/test/ndcg@10"] == metrics["test/ndcg@10"]
    assert summary["test/ndcg@10"] == metrics["test/ndcg@10"]


@pytest.mark.parametrize("preset", ["fdr", "default"])
def test_debug_presets_export_nothing(tmp_path, preset):
    """A check of a config (debug=fdr, debug=default) trains and tests but leaves the adapter store alone."""
    from recsys.pipeline.run import train

    _, metrics = train(config(tmp_path / "run", tmp_path / "store", f"debug={preset}", "data.target=toys",
                              "trainer.limit_train_batches=2", "zero_shot=false"))
    assert "test/ndcg@10" in metrics
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))


def test_failed_jobs_of_a_sweep(tmp_path):
    """One line a failed job: its failed.json's error, or no metrics.json; a job that failed and then finished
    when the sweep was started again (a newer metrics.json) is not listed."""
    import os

    from recsys.pipeline.sweeps import failed_jobs

    for job in ("0", "1", "2", "3"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / "metrics.json").write_text("{}")
    (tmp_path / "1" / "failed.json").write_text(json.dumps({"error": "UserError: data.target=x\nmore"}))
    (tmp_path / "3" / "failed.json").write_text(json.dumps({"error": "RuntimeError: once"}))
    (tmp_path / "3" / "metrics.json").write_text("{}")
    os.utime(tmp_path / "3" / "failed.json", (1, 1))
    assert failed_jobs(tmp_path) == [(tmp_path / "1", "UserError: data.target=x"),
                                     (tmp_path / "2", "no metrics.json: the job ended without finishing (see its log)")]
