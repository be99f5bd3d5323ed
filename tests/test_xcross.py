"""X-Cross end to end: ``train.py method=xcross`` on the tiny encoder and the tiny decoder over source
adapters that ``method=lora`` runs put in the store in the same test; the metrics.json contract and
parameter accounting; ``evaluate.py`` reproducing the test metrics from the saved checkpoint; the
"source adapter used as-is on the target" row through X-Cross (one-hot w, that source's head, no
training) equal to evaluating the adapter itself; ``train_missing``; clear errors for bad inputs
(missing adapters with their exact train.py commands, another backbone, another rank, the target
among the sources, fewer than two sources, sources changed since training); the presets compose;
and a data-efficiency multirun.

Runs go through the real pipeline in-process (``hydra.compose`` + ``recsys.pipeline.run.train``/``evaluate``,
as train.py/evaluate.py call them) on tiny random models, 2 batches and 8 evaluation users.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from recsys.methods.lora import LoRAModule
from recsys.methods.xcross import SourceAdapterError
from recsys.pipeline.stages import train_command
from recsys.models.adapter_store import AdapterStore
from recsys.models.backbone import load_backbone
from recsys.models.integrator import XCrossModel
from recsys.pipeline.run import build_backbone, build_datamodule, build_module, evaluate, train
from conftest import compose_config, paths_under

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
REPO = Path(__file__).resolve().parents[1]
ROWS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr")
CONTRACT = (
    [f"test/{k}" for k in ROWS] + [f"val/{k}" for k in ROWS]
    + [f"{r}/test/{k}" for r in ("zero_shot", "random", "popularity") for k in ROWS]
    + ["params/trainable", "params/lora_reference", "time/train_s", "time/test_s"]
)
TRAINER = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.precision=32-true", "logger=none",
           "~callbacks.rich_progress_bar", "export_adapter=force"]  # a tiny run at chance is stored only by force
DATA = ["data.max_eval_users=8", "data.batch_size=4", "data.eval_batch_size=8", "data.max_train_examples=64"]
TINY = [*TRAINER, *DATA, "zero_shot=false"]
TARGET, SOURCES = "tools", ["toys", "sports"]
XCROSS = ["method=xcross", f"data.target={TARGET}", f"data.sources=[{','.join(SOURCES)}]"]
BACKBONES = {"tiny_encoder": "tiny:encoder", "tiny_decoder": "tiny:decoder"}


def config(tmp: Path, *overrides: str, name: str = "train", store: Path | None = None, hydra_cfg: bool = False):
    return compose_config(name, *paths_under(tmp, store, tmp.parent / "cache"), *overrides, hydra_cfg=hydra_cfg)


def run_train(tmp: Path, *overrides: str, store: Path) -> dict:
    """train.py in-process; the config goes to ``<tmp>/.hydra/config.yaml`` as train.py's would."""
    cfg = config(tmp, *TINY, *overrides, store=store)
    (tmp / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, tmp / ".hydra" / "config.yaml")
    _, metrics = train(cfg)
    return metrics


def run_evaluate(out: Path, *overrides: str, store: Path) -> dict:
    _, metrics = evaluate(config(out, "trainer.precision=32-true", *overrides, name="eval", store=store))
    return metrics


def build(tmp: Path, *overrides: str, store: Path):
    """The X-Cross module as train.py builds it (no training)."""
    cfg = config(tmp, *TINY, *overrides, store=store)
    backbone = build_backbone(cfg)
    return build_module(cfg, backbone, build_datamodule(cfg, backbone), AdapterStore(store))


def store_path(store: Path, backbone: str, domain: str, seed: int = 0) -> Path:
    return AdapterStore(store, seed=seed).path(BACKBONES[backbone], domain)


# --------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per backbone: method=lora on each source (into a fresh store), then X-Cross over them (with the
    zero-shot row): {backbone: {"tmp", "store", "lora": {source: metrics}, "run", "metrics"}}."""
    out = {}
    for bb in BACKBONES:
        tmp = tmp_path_factory.mktemp(bb)
        store = tmp / "store"
        lora = {s: run_train(tmp / f"lora-{s}", f"backbone={bb}", "method=lora", f"data.target={s}", store=store)
                for s in SOURCES}
        metrics = run_train(tmp / "xcross", f"backbone={bb}", *XCROSS, "zero_shot=true", store=store)
        out[bb] = {"tmp": tmp, "store": store, "lora": lora, "run": tmp / "xcross", "metrics": metrics}
    return out


@pytest.mark.parametrize("bb", list(BACKBONES))
def test_metrics_contract_and_parameter_accounting(runs, bb):
    r = runs[bb]
    m = json.loads((r["run"] / "metrics.json").read_text())
    assert m == pytest.approx(r["metrics"])
    missing = [k for k in CONTRACT if k not in m]
    assert not missing, missing
    for row in ("test", "val", "zero_shot/test"):
        assert 0 <= m[f"{row}/hr@1"] <= m[f"{row}/hr@5"] <= m[f"{row}/hr@10"] <= 1
    assert m["time/train_s"] > 0 and json.loads((r["run"] / "run.json").read_text())["trained"] is True
    assert set(m) >= {f"xcross/w_{s}" for s in SOURCES}
    # what trains: L integrators of 2n(n-1) x nd, the n weights w, the head (the same head as a LoRA's)
    backbone = load_backbone(BACKBONES[bb])
    d, layers, n = backbone.model.config.hidden_size, backbone.model.config.num_hidden_layers, len(SOURCES)
    integrators = XCrossModel.integrator_param_count(n, d, layers)
    assert m["params/integrators"] == integrators
    lora_trainable = r["lora"][SOURCES[0]]["params/trainable"]  # a LoRA run trains its adapter + the head
    head = lora_trainable - m["params/lora_reference"]
    assert head == d * d + d + d + 1  # dense d x d + bias, output d + bias: the reference is the adapter alone
    assert m["params/trainable"] == integrators + n + head
    assert m["params/integrators_over_lora"] == pytest.approx(integrators / m["params/lora_reference"])
    if bb == "tiny_encoder":  # n = 2, r = 8 on q and v (the encoder default): the paper's 25%
        assert m["params/lora_reference"] == layers * 2 * 8 * (d + d)
        assert m["params/integrators_over_lora"] == 0.25


def test_checkpoint_holds_the_trained_parts_and_the_sources_fingerprints(runs):
    r = runs["tiny_encoder"]
    best = json.loads((r["run"] / "run.json").read_text())["best_checkpoint"]
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.startswith(("xcross.integrators.", "xcross.w", "xcross.head.")) for k in keys), keys
    assert list(ckpt["xcross_sources"]) == SOURCES


@pytest.mark.parametrize("bb", list(BACKBONES))
def test_evaluate_run_dir_reproduces_test_metrics(runs, bb, tmp_path):
    r = runs[bb]
    again = run_evaluate(tmp_path / "eval", f"run_dir={r['run']}", store=r["store"])
    for k in ROWS:
        assert again[f"test/{k}"] == r["metrics"][f"test/{k}"], k


@pytest.mark.parametrize("bb", list(BACKBONES))
def test_one_hot_w_untrained_is_the_source_adapter_as_is(runs, bb, tmp_path):
    """w = (1, 0), source 1's head, zero integrators, no training: X-Cross's test metrics are those
    of ``evaluate.py adapter=<store>/<backbone>/<source 1> data.target=<target>``."""
    r, first = runs[bb], SOURCES[0]
    xc = run_train(tmp_path / "asis", f"backbone={bb}", *XCROSS, "method.module.w_init=[1,0]",
                   f"method.module.head_init={first}", "trainer.max_epochs=0", store=r["store"])
    direct = run_evaluate(tmp_path / "eval", f"backbone={bb}", f"adapter={store_path(r['store'], bb, first)}",
                          f"data.target={TARGET}", *DATA, store=r["store"])
    for k in ROWS:
        assert xc[f"test/{k}"] == pytest.approx(direct[f"test/{k}"], abs=1e-6), k
    assert xc["xcross/w_toys"] == 1.0 and xc["xcross/w_sports"] == 0.0


# --------------------------------------------------------------------------------------------- sources
def test_train_missing_trains_only_the_missing_sources_on_all_their_data(runs, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(store_path(runs["tiny_encoder"]["store"], "tiny_encoder", "toys"),
                    store_path(store, "tiny_encoder", "toys"))
    kept = (store_path(store, "tiny_encoder", "toys") / "manifest.json").read_text()
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", *XCROSS, "method.module.train_missing=true",
                        "data.target_fraction=0.5", store=store)
    assert "test/ndcg@10" in metrics
    assert (store_path(store, "tiny_encoder", "toys") / "manifest.json").read_text() == kept  # not retrained
    manifest = json.loads((store_path(store, "tiny_encoder", "sports") / "manifest.json").read_text())
    assert manifest["domain"] == "sports" and manifest["method"] == "lora"
    assert manifest["data"]["target_fraction"] == 1.0  # the fraction is X-Cross's target's, not the sources'
    assert (tmp_path / "run" / "sources" / "sports" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "sources" / "toys").exists()


def test_missing_adapters_name_each_and_the_command(tmp_path):
    with pytest.raises(SourceAdapterError) as e:
        build(tmp_path, "backbone=tiny_encoder", *XCROSS, store=tmp_path / "empty")
    text = str(e.value)
    assert "missing source adapters for ['toys', 'sports']" in text and "tiny:encoder" in text
    for s in SOURCES:
        assert f"python train.py method=lora data.target={s} seed=0" in text
    assert "method.module.train_missing=true" in text


def test_missing_adapter_command_is_exact_and_produces_the_adapter(tmp_path):
    """Inside a Hydra app the command carries the backbone, the data config and the run's own data.*
    overrides (not the target's fraction); run as given, it fills the store."""
    store = tmp_path / "store"
    cfg = config(tmp_path, *TINY, "backbone=tiny_encoder", *XCROSS, "data.target_fraction=0.5", "seed=3",
                 store=store, hydra_cfg=True)
    HydraConfig.instance().set_config(cfg)
    try:
        cmd = train_command(cfg, "sports")
    finally:
        HydraConfig.instance().cfg = None
    assert cmd == ("python train.py method=lora backbone=tiny_encoder data=synthetic "
                   f"paths.adapter_store={store} paths.cache_dir={tmp_path.parent}/cache data.max_eval_users=8 "
                   "data.batch_size=4 data.eval_batch_size=8 data.max_train_examples=64 data.target=sports seed=3")
    args = [a for a in shlex.split(cmd)[2:] if not a.startswith("paths.")]  # config() sets the same paths
    cfg = config(tmp_path / "run", *TRAINER, "zero_shot=false", *args, store=store)
    train(cfg)
    manifest = json.loads((store_path(store, "tiny_encoder", "sports", seed=3) / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["data"]["max_train_examples"] == 64
    # the Amazon preset's sources come from amazon_lora_cpu: the command says so
    cfg = config(tmp_path, "experiment=xcross_amazon_cpu", hydra_cfg=True)
    HydraConfig.instance().set_config(cfg)
    try:
        cmd = train_command(cfg, "toys")
    finally:
        HydraConfig.instance().cfg = None
    assert cmd.startswith("python train.py experiment=amazon_lora_cpu method=lora backbone=minilm data=amazon ")
    assert cmd.endswith(" data.target=toys seed=0")


def test_adapters_of_another_backbone_fail_clearly(runs, tmp_path):
    enc = runs["tiny_encoder"]["store"]
    # the store's decoder slots hold encoder adapters (copied, manifests say tiny:encoder)
    store = tmp_path / "store"
    for s in SOURCES:
        shutil.copytree(store_path(enc, "tiny_encoder", s), store_path(store, "tiny_decoder", s))
    with pytest.raises(SourceAdapterError, match="'toys' .* trained on backbone 'tiny:encoder', not 'tiny:decoder'"):
        build(tmp_path, "backbone=tiny_decoder", *XCROSS, store=store)
    # explicit adapter folders
    folders = ",".join(f"{s}:'{store_path(enc, 'tiny_encoder', s)}'" for s in SOURCES)
    with pytest.raises(SourceAdapterError, match="trained on backbone 'tiny:encoder', not 'tiny:decoder'"):
        build(tmp_path, "backbone=tiny_decoder", *XCROSS, f"method.module.adapters={{{folders}}}", store=store)


def test_adapters_of_another_rank_fail_clearly(runs, tmp_path):
    store = Path(shutil.copytree(runs["tiny_encoder"]["store"], tmp_path / "store"))
    run_train(tmp_path / "lora-r4", "backbone=tiny_encoder", "method=lora", "data.target=sports",
              "method.module.r=4", store=store)
    with pytest.raises(SourceAdapterError, match=r"one rank .*toys: r=8 .*sports: r=4"):
        build(tmp_path, "backbone=tiny_encoder", *XCROSS, store=store)


def test_target_among_sources_or_fewer_than_two_sources_fail_clearly(runs, tmp_path):
    store = runs["tiny_encoder"]["store"]
    with pytest.raises(Exception, match="lists the target 'tools'"):
        build(tmp_path, "backbone=tiny_encoder", "method=xcross", "data.sources=[tools,toys]", store=store)
    for sources in ("[toys]", "[]"):
        with pytest.raises(SourceAdapterError, match="at least two source domains"):
            build(tmp_path, "backbone=tiny_encoder", "method=xcross", f"data.sources={sources}", store=store)
    with pytest.raises(SourceAdapterError, match="at least two source adapters"):
        build(tmp_path, "backbone=tiny_encoder", "method=xcross",
              f"method.module.adapters={{toys:'{store_path(store, 'tiny_encoder', 'toys')}'}}", store=store)


def test_sources_trained_with_other_prompt_settings_warn(runs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="recsys"):
        build(tmp_path, "backbone=tiny_encoder", *XCROSS, "data.max_history=3", store=runs["tiny_encoder"]["store"])
    assert "source adapter toys was trained with other data.max_history ({'max_history': 5})" in caplog.text


def test_sources_changed_since_training_fail_clearly(runs, tmp_path):
    """The checkpoint holds only integrators, w and head: evaluating it on other source adapters is refused."""
    r = runs["tiny_encoder"]
    store = Path(shutil.copytree(r["store"], tmp_path / "store"))
    LoRAModule(load_backbone("tiny:encoder")).export(AdapterStore(store), {"domain": "sports", "method": "lora"})
    with pytest.raises(SourceAdapterError, match=r"source adapters \['sports'\] differ"):
        run_evaluate(tmp_path / "eval", f"run_dir={r['run']}", store=store)


# --------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["xcross_synthetic", "xcross_amazon_cpu", "data_efficiency"])
def test_presets_compose(name, tmp_path):
    c = config(tmp_path, f"experiment={name}", hydra_cfg=True)
    assert c.method.name == "xcross" and len(c.data.sources) == 2 and c.data.target not in c.data.sources
    if name == "xcross_amazon_cpu":  # amazon_lora_cpu's data, backbone and trainer, as they are
        lora = config(tmp_path, "experiment=amazon_lora_cpu")
        for key in ("data", "backbone", "trainer"):
            mine, theirs = (OmegaConf.to_container(x[key]) for x in (c, lora))
            if key == "data":
                mine, theirs = ({k: v for k, v in x.items() if k not in ("target", "sources")} for x in (mine, theirs))
            assert mine == theirs, key
    if name == "data_efficiency":
        assert c.hydra.mode.name == "MULTIRUN"
        assert dict(c.hydra.sweeper.params) == {"method": "lora,xcross", "data.target_fraction": "0.25,0.5,0.75,1.0",
                                                "seed": "0,1,2"}


def test_data_efficiency_multirun(runs, tmp_path, monkeypatch):
    """The preset as one multirun (train.py in-process), narrowed on the command line to 2 fractions x
    2 methods x 1 seed: every job completes, LoRA jobs stay out of the store, fractions take effect."""
    import runpy

    store = runs["tiny_encoder"]["store"]
    before = sorted(p.name for p in store_path(store, "tiny_encoder", "toys").parent.iterdir())
    args = ["experiment=data_efficiency", "backbone=tiny_encoder", f"data.sources=[{','.join(SOURCES)}]",
            "data.target_fraction=0.5,1.0", "seed=0", *TRAINER, *DATA[:3], f"hydra.sweep.dir={tmp_path}/multirun",
            f"paths.adapter_store={store}", f"paths.cache_dir={tmp_path.parent}/cache"]
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py"), *args])
    GlobalHydra.instance().clear()
    t0 = time.time()
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")  # python train.py <args>, in this process
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    took = time.time() - t0
    jobs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert [j.name.split("_", 1)[1] for j in jobs] == ["lora_f0.5_s0", "lora_f1.0_s0", "xcross_f0.5_s0",
                                                       "xcross_f1.0_s0"], jobs
    metrics = {}
    for j in jobs:
        assert not (j / "failed.json").exists(), (j / "failed.json").read_text()
        metrics[j.name.split("_", 1)[1]] = json.loads((j / "metrics.json").read_text())
    for method in ("lora", "xcross"):
        half, full = metrics[f"{method}_f0.5_s0"], metrics[f"{method}_f1.0_s0"]
        assert 0.4 < half["data/train_examples"] / full["data/train_examples"] < 0.6
        assert all(f"test/{k}" in half for k in ROWS)
    assert "params/integrators" in metrics["xcross_f1.0_s0"] and "params/integrators" not in metrics["lora_f1.0_s0"]
    assert sorted(p.name for p in store_path(store, "tiny_encoder", "toys").parent.iterdir()) == before
    assert took < 120, took
