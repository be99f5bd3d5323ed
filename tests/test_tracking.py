"""What the loggers receive (recsys/pipeline/tracking.py): the resolved config and parameter counts on every
logger, the learning rate, group/tags/job_type, the mode from WANDB_MODE, the exported adapter as a
model artifact with its manifest, the adapters a run read (lineage), the results table.

The wandb runs are offline; the test reads their record log (``run-<id>.wandb``) as wandb sync would.
"""

import json

import pytest
import yaml
from test_lora import REPO, run
from wandb_files import config_of, history_keys, of_type, wandb_records

TINY = ["backbone=tiny_encoder", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.max_eval_users=8",
        "data.batch_size=8", "callbacks.rich_progress_bar=null",
        "trainer.log_every_n_steps=1", "export_adapter=force"]  # a tiny run at chance is stored only by force


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    store = f"paths.adapter_store={tmp}/store"
    run("train.py", *TINY, "logger=[csv,wandb]", "data.target=toys", "tags=[mine]", f"hydra.run.dir={tmp}/toys", store)
    run("train.py", *TINY, "logger=none", "data.target=tools", "zero_shot=false", f"hydra.run.dir={tmp}/tools", store)
    run("train.py", *TINY, "logger=wandb", "method=merge_sources", "data.target=tools", "data.sources=[toys]",
        "zero_shot=false", f"hydra.run.dir={tmp}/merge", store)
    run("evaluate.py", "backbone=tiny_encoder", "data.max_eval_users=8", "logger=wandb", "data.target=tools",
        f"adapter={tmp}/store/tiny-encoder/toys", f"hydra.run.dir={tmp}/eval", store)
    return tmp


def test_config_and_parameter_counts_on_every_logger(runs):
    records = wandb_records(runs / "toys")
    cfg = config_of(records)
    assert "hydra" not in cfg
    assert cfg["method"]["name"] == "lora" and cfg["data"]["target"] == "toys" and cfg["seed"] == 0
    assert cfg["method"]["module"]["r"] == 8 and cfg["method"]["module"]["optimizer"]["lr"] > 0
    metrics = json.loads((runs / "toys" / "metrics.json").read_text())
    assert cfg["params/trainable"] == metrics["params/trainable"] and cfg["params/total"] > cfg["params/trainable"]
    hparams = yaml.safe_load((runs / "toys" / "csv" / "hparams.yaml").read_text())  # the CSV logger has them too
    assert hparams["method"]["name"] == "lora" and hparams["params/trainable"] == metrics["params/trainable"]
    (info,) = of_type(records, "run")
    assert (info.run_group, info.job_type, info.display_name) == ("lora-toys", "train", "lora-toys-s0")
    assert list(info.tags) == ["mine"]
    keys = history_keys(records)
    assert "lr" in keys, keys  # LearningRateMonitor: one parameter group, the scheduler's name
    assert {"train/loss", "val/ndcg@10", "test/ndcg@10", "results/path"} <= keys  # results: the table


def test_exported_adapter_is_a_model_artifact(runs):
    (art,) = [a for a in of_type(wandb_records(runs / "toys"), "artifact") if a.type == "model"]
    manifest = json.loads((runs / "store" / "tiny-encoder" / "toys" / "seed-0" / "manifest.json").read_text())
    assert art.name == "synthetic-tiny-encoder-toys"
    assert json.loads(art.metadata) == json.loads(json.dumps(manifest))
    files = {c.path for c in art.manifest.contents}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "manifest.json"} <= files


def test_results_table(runs):
    tables = list((runs / "toys").glob("wandb/offline-run-*/files/media/table/results_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    metrics = json.loads((runs / "toys" / "metrics.json").read_text())
    assert table["columns"][:2] == ["row", "hr@1"]
    rows = {r[0]: r for r in table["data"]}
    assert set(rows) == {"model", "zero_shot", "random", "popularity"}
    assert rows["model"][table["columns"].index("ndcg@10")] == pytest.approx(metrics["test/ndcg@10"])


def test_lineage_of_runs_that_read_adapters(runs):
    merge = wandb_records(runs / "merge")
    assert config_of(merge)["lineage/inputs"] == ["synthetic-tiny-encoder-tools", "synthetic-tiny-encoder-toys"]
    assert not [a for a in of_type(merge, "artifact") if a.type == "model"]  # merge_sources exports nothing
    ev = wandb_records(runs / "eval")
    (info,) = of_type(ev, "run")
    assert info.job_type == "evaluate" and info.run_group == "lora-tools"
    assert config_of(ev)["lineage/inputs"] == ["synthetic-tiny-encoder-toys"]
    assert "test/ndcg@10" in history_keys(ev)


def test_online_runs_use_the_input_artifacts(tmp_path):
    """Online, each input is ``use_artifact``-ed by name (offline wandb refuses use_artifact)."""
    from lightning.pytorch.loggers import WandbLogger

    from recsys.pipeline.tracking import use_adapters

    class Run:  # what use_adapters touches of a wandb run
        class settings:  # noqa: N801
            _offline = False

        def __init__(self):
            self.config, self.used = {}, []
            self.config = type("C", (), {"update": lambda s, d, allow_val_change: self.used.append(("config", d))})()

        def use_artifact(self, name, type):  # noqa: A002
            self.used.append((name, type))

    folder = tmp_path / "beauty"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"backbone": "embedded:minilm-l6", "name": "hybrid-beauty+toys",
                                                      "data": {"collection": "amazon"}}))
    fake = Run()
    assert use_adapters([WandbLogger(experiment=fake)], [folder, folder, tmp_path / "no-adapter"]) == [
        "amazon-embedded-minilm-l6-hybrid-beauty-toys"]
    assert fake.used == [("config", {"lineage/inputs": ["amazon-embedded-minilm-l6-hybrid-beauty-toys"]}),
                         ("amazon-embedded-minilm-l6-hybrid-beauty-toys:latest", "model")]


def test_mode_follows_wandb_mode(monkeypatch):
    from hydra import compose, initialize_config_dir

    for env, mode in [(None, "offline"), ("online", "online"), ("disabled", "disabled")]:
        if env is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", env)
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            c = compose("train", overrides=["logger=wandb", "paths.output_dir=/tmp/x"])
        assert c.logger.wandb.mode == mode
        assert "offline" not in c.logger.wandb  # nothing overrides the mode
