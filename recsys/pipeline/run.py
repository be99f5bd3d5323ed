"""The pipeline behind ``train.py`` and ``evaluate.py``: build, fit, test, report.

Reads top to bottom: seed, backbone, data, method (its stored adapters found or trained first by
``recsys.pipeline.stages``), callbacks/loggers/trainer, zero-shot test, fit with validation-based checkpointing,
test with the best checkpoint, ``metrics.json``, results table, adapter export.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from recsys.evaluation import ranks
from recsys.pipeline import checks, scale, speed, stages, sweeps, tracking
from recsys.pipeline.stages import exports, force_export, method_class
from recsys.data.datamodule import RecDataModule
from recsys.core.errors import UserError
from recsys.core.files import check_writable, read_json, write_json, write_text
from recsys.methods.base import RecModule, RunInfo, method_classes
from recsys.core.metrics import PAPER_KEYS, REPORT_KEYS
from recsys.models import adapter_store
from recsys.models.adapter_store import AdapterStore
from recsys.models.backbone import load_backbone
from recsys.models.sharded_load import gather_trainable, hollow_backbone

log = logging.getLogger("recsys")


# ---------------------------------------------------------------------------------------------- build
HF_OPTIONS = ("revision", "trust_remote_code", "attn_implementation")  # backbone keys passed to from_pretrained


def build_backbone(cfg: DictConfig):
    """The frozen backbone; under ``trainer=fsdp2`` hollow (no weights read: each rank reads its shard once the
    module is sharded, ``RecModule.configure_model``)."""
    b = cfg.backbone
    options = {k: b[k] for k in HF_OPTIONS if b.get(k) is not None}
    if scale.sharded_loading(cfg):
        return hollow_backbone(b.name, dtype=b.get("dtype", "float32"), tokenizer=b.get("tokenizer"),
                               lora_targets=b.get("lora_target_modules"), **options)
    return load_backbone(b.name, dtype=b.get("dtype", "float32"), cache_dir=os.path.join(cfg.paths.cache_dir, "backbones"),
                         tokenizer=b.get("tokenizer"), lora_targets=b.get("lora_target_modules"), **options)


def prompt_layout(backbone, scoring: str) -> bool:
    """Whether batches come as one prompt a user + the candidates' continuations (``attach(likelihood=True)``):
    for every decoder, whatever the scoring, so that training and evaluation read the prompt once for
    all candidates (``recsys.models.scoring``); pairs for encoders."""
    return scoring == "likelihood" or backbone.kind == "decoder"


def build_datamodule(cfg: DictConfig, backbone=None) -> RecDataModule:
    """The DataModule (every data setting is checked on construction), attached to ``backbone``'s tokenizer."""
    dm = RecDataModule.from_config(OmegaConf.to_container(cfg.data, resolve=True), mix=cfg.method.get("mix", "target"),
                                   seed=cfg.seed)
    return dm if backbone is None else attach_backbone(cfg, dm, backbone)


def attach_backbone(cfg: DictConfig, dm: RecDataModule, backbone, scoring: str | None = None) -> RecDataModule:
    """``dm`` attached to ``backbone``'s tokenizer (nothing for a method without a backbone: id batches)."""
    if backbone is None:
        return dm.attach_ids()
    likelihood = prompt_layout(backbone, scoring or cfg.method.module.get("scoring", "head"))
    return dm.attach(backbone.tokenizer, backbone.kind, likelihood=likelihood)


RECIPE_KEYS = ("optimizer", "scheduler", "warmup_ratio")  # a method reads them from the recipe, never its own


def check_recipe_keys(cfg: DictConfig) -> None:
    """UserError when ``method.module`` sets its own optimizer, scheduler or warm-up instead of interpolating
    the recipe's (``${recipe.optimizer}``): replacing the whole node would give one method its own learning
    rate, which a comparison of methods under one recipe refuses (set ``recipe.optimizer.lr`` for all)."""
    module = cfg.method.get("module") or {}
    for key in RECIPE_KEYS:
        if key in module and not (OmegaConf.is_interpolation(module, key)
                                  and str(module._get_node(key)._value()).strip("${} ") == f"recipe.{key}"):
            raise UserError(f"method.module.{key} is set by the method ({OmegaConf.to_container(module)[key]!r}); "
                            f"every method trains with the recipe's: set recipe.{key} (e.g. recipe.optimizer.lr=...), "
                            f"and keep method.module.{key}: ${{recipe.{key}}}")


def run_info(cfg: DictConfig, dm: RecDataModule, store: AdapterStore | None) -> RunInfo:
    """The narrow view of the run a method is built from (``RecModule.from_config``)."""
    target = dm.domains.get(dm.target)
    return RunInfo(target=dm.target, sources=tuple(dm.sources), mix=dm.mix, seed=int(cfg.seed),
                   data=OmegaConf.to_container(cfg.data, resolve=True), store=store,
                   num_items=target.num_items if target is not None else 0,
                   monitor=cfg.get("optimized_metric") or "val/ndcg@10",
                   paper=dm.paper_prompt() if dm.protocol == "paper" else None)


def build_module(cfg: DictConfig, backbone, dm: RecDataModule, store: AdapterStore):
    """The method's module: its required stored adapters found (the missing ones trained first with
    ``method.module.train_missing``, ``recsys.pipeline.stages``), then ``cls.build(backbone, run, **its config keys)``;
    the DataModule then loads only the training streams the module trains."""
    cls, kwargs = method_class(cfg)  # its keys were checked before anything loaded (recsys.pipeline.checks)
    train_missing = any([kwargs.pop(k, False) for k in stages.PIPELINE_KEYS])
    run = run_info(cfg, dm, store)
    specs = cls.required_adapters(run, backbone, **kwargs)
    if specs:
        found, absent = stages.provide(cfg, specs, getattr(backbone, "name", ""), store, train_missing, train)
        run = replace(run, adapters=found, absent=absent)
    module = cls.build(backbone, run, **kwargs)
    dm.train_only(module.train_streams(), module.train_examples(), module.epoch_batches())
    return module


def build_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(tracking.RankWriter(cfg.paths.output_dir))  # per-user ranks (ranks.csv.gz) of every evaluation
    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        kwargs = {}  # a resumable run continues its wandb run (the id is kept in the run folder)
        if cfg.get("auto_resume") and str(c.get("_target_", "")).endswith("WandbLogger"):
            kwargs = scale.wandb_resume_kwargs(cfg.paths.output_dir)
        loggers.append(hydra.utils.instantiate(c, **kwargs))
    if not loggers:  # LearningRateMonitor refuses a trainer without a logger (logger=none)
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if "plugins" not in overrides and "plugins" not in cfg.trainer and scale.slurm_plugins():
        overrides["plugins"] = scale.slurm_plugins()  # one requeue mechanism: scale.SlurmRequeue, not Lightning's
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    scale.use_atomic_checkpoints(trainer)  # a full disk never leaves a truncated last.ckpt
    return trainer


# ---------------------------------------------------------------------------------------------- report
def _floats(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float, torch.Tensor))}


def results_table(metrics: dict, title: str, split: str = "test") -> str:
    """The results table (model, zero-shot, random, popularity rows) as printed text (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("row")
    for k in REPORT_KEYS:
        table.add_column(f"{split} {k}", justify="right")
    rows = [("model", f"{split}/")] + [(r, f"{r}/{split}/") for r in ("zero_shot", "random", "popularity")]
    for name, prefix in rows:
        if f"{prefix}hr@1" in metrics:
            table.add_row(name, *[f"{metrics.get(prefix + k, math.nan):.4f}" for k in REPORT_KEYS])
    console = Console(width=130, record=True)
    console.print(table)
    if "merge/scale" in metrics:  # merge_sources: the merge's scale chosen on validation
        console.print(f"merge chosen on validation: scaling {metrics['merge/scale']:g}, density {metrics['merge/density']:g}")
    if f"{split}/gen/mrr" in metrics:  # the paper protocol: generated answers beside the likelihood ranking
        paper = Table(title="paper protocol (same candidates)")
        paper.add_column("row")
        for k in PAPER_KEYS:
            paper.add_column(f"{split} {k}", justify="right")
        for name, prefix in [("likelihood", f"{split}/"), ("generated", f"{split}/gen/"),
                             ("zero_shot likelihood", f"zero_shot/{split}/"), ("zero_shot generated", f"zero_shot/{split}/gen/")]:
            if f"{prefix}mrr" in metrics:
                paper.add_row(name, *[f"{metrics.get(prefix + k, math.nan):.4f}" for k in PAPER_KEYS])
        console.print(paper)
    return console.export_text()


# ---------------------------------------------------------------------------------------------- train
RUN_JSON_FIX = ("train.py writes it (best checkpoint, completion): delete it and run the same command again "
                "(hydra.run.dir of that run; its checkpoints are kept)")


def completed_metrics(cfg: DictConfig) -> dict | None:
    """``metrics.json`` of a run that finished in this run folder under the same settings (``auto_resume``, no
    ``ckpt_path``), else None; a folder whose checkpoints are of other settings raises (``scale.check_config``)."""
    out_dir = Path(cfg.paths.output_dir)
    info, metrics, ckpts = out_dir / "run.json", out_dir / "metrics.json", out_dir / "checkpoints"
    if cfg.get("ckpt_path") or not cfg.get("auto_resume") or not info.is_file() or not metrics.is_file():
        return None
    if not read_json(info, RUN_JSON_FIX).get("complete") or not (ckpts / "config.json").is_file() \
            or not any(ckpts.glob("*.ckpt")):
        return None
    scale.check_config(out_dir, cfg)
    return read_json(metrics, "delete it and run the same command again: the run is tested again from its checkpoints")


def zero_shot_test(trainer: L.Trainer, module: RecModule, dm: RecDataModule, out_dir: Path) -> dict:
    """The untrained module's test metrics as ``zero_shot/test/...``: a test of its own, before training, that
    the loggers get with the run's other metrics at the end (not as ``test/...`` at step 0); its per-user
    ranks in ``out_dir`` become the ``zero_shot/test`` rows."""
    loggers, trainer.loggers = trainer.loggers, []
    try:
        out = trainer.test(module, datamodule=dm, verbose=False, weights_only=True)[0]
    finally:
        trainer.loggers = loggers
    if trainer.is_global_zero:
        ranks.rename_split(out_dir, "test", "zero_shot/test")  # its per-user ranks, apart from the final test's
    return {f"zero_shot/{k}": v for k, v in _floats(out).items()}


def untrained_zero_shot(metrics: dict, out_dir: Path | None) -> dict:
    """The zero-shot row of a run that trains nothing (a merge of stored adapters, trainer.max_epochs=0): the
    tested model is the untrained one, so its test metrics and per-user ranks are the row, not a second test."""
    ranks.rename_split(out_dir, "test", "zero_shot/test", keep=True)
    return {f"zero_shot/{k}": v for k, v in metrics.items() if k.startswith("test/") and not k.startswith("test/full/")}


def run_store(cfg: DictConfig, dm: RecDataModule) -> AdapterStore:
    """The adapter store of this run's data (``adapter_store.data_store``: one store folder a data root), knowing
    the fingerprints of the domains read (``dm.load_domains()`` first); StoreError for a domain name that is no
    plain name (it would be a path in the store)."""
    for name in dm.domains:
        adapter_store.check_name(name, "domain name (data.target / data.sources)")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return AdapterStore(adapter_store.data_store(cfg.paths.adapter_store, data.get("root")), seed=cfg.seed,
                        data={n: d.fingerprint for n, d in dm.domains.items()}, settings=data,
                        monitor=cfg.get("optimized_metric") or "val/ndcg@10",
                        force=force_export(cfg))


def train(cfg: DictConfig) -> tuple[float, dict]:
    """Train and test one method as configured; returns (optimized metric, metrics.json content)."""
    out_dir = Path(cfg.paths.output_dir)
    done = completed_metrics(cfg)
    if done is not None:  # a finished run started again: its figures stand, nothing is re-run or re-exported
        log.info("%s holds a finished run of these settings: nothing to do (metrics.json kept). A new "
                 "hydra.run.dir (or auto_resume=false) trains again", out_dir)
        return float(done.get(cfg.optimized_metric, math.nan)), done
    check_recipe_keys(cfg)  # a method never sets its own optimizer, scheduler or warm-up
    dm = checks.config(cfg)  # every setting checked (recsys.pipeline.checks), before anything heavy loads
    check_writable(out_dir, "the run folder", "hydra.run.dir")  # a read-only folder fails now, not after training
    if cfg.get("auto_resume") and not cfg.get("ckpt_path") and (out_dir / "checkpoints" / "config.json").is_file():
        scale.check_config(out_dir, cfg)  # this folder's checkpoints are of other settings: say so now
    dm.load_domains()
    checks.data(dm)  # the data as read: still before the backbone loads
    store = run_store(cfg, dm)  # domain names checked, the store's folder derived from the data
    if exports(cfg):
        check_writable(store.root, "the adapter store", "paths.adapter_store")
    L.seed_everything(cfg.seed, workers=True)
    backbone = build_backbone(cfg) if method_class(cfg)[0].needs_backbone else None
    attach_backbone(cfg, dm, backbone)
    module = speed.apply(build_module(cfg, backbone, dm, store), cfg.get("speed"))
    trainer = build_trainer(cfg)
    dm.prepare_data()
    dm.setup("fit")
    metrics: dict = {"params/trainable": module.num_trainable()}
    metrics.update(module.extra_params())
    tracking.log_hyperparameters(trainer.loggers, cfg, {**metrics, "params/total": sum(p.numel() for p in module.parameters())})
    tracking.use_adapters(trainer.loggers, module.input_adapters())
    tracking.define_summary(trainer.loggers, cfg.optimized_metric)

    if cfg.zero_shot and trains(cfg, module):
        metrics.update(zero_shot_test(trainer, module, dm, out_dir))
    trained, best = fit(cfg, trainer, module, dm, metrics)
    metrics.update(best_test_metrics(cfg, trainer, module, dm, best))
    if cfg.zero_shot and not trained:
        metrics.update(untrained_zero_shot(metrics, out_dir if trainer.is_global_zero else None))
    metrics.update(module.extra_metrics())
    if trained:
        metrics.update(module.training_health())
    gather_trainable(module)  # a sharded run (trainer=fsdp2): the trainable weights whole again, for the export
    if trainer.is_global_zero:
        report_and_export(cfg, trainer, module, store, metrics, best, trained)
    return float(metrics.get(cfg.optimized_metric, math.nan)), metrics


def trains(cfg: DictConfig, module: RecModule) -> bool:
    """Whether the run trains: not at trainer.max_epochs=0, nor a method with nothing to train."""
    return cfg.trainer.max_epochs != 0 and not module.skip_training


def fit(cfg: DictConfig, trainer: L.Trainer, module: RecModule, dm: RecDataModule, metrics: dict) -> tuple[bool, str]:
    """Train (resuming a run restarted in its folder) unless there is nothing to train; adds the training time,
    the epochs run (``train/epochs``), the selected epoch (``train/best_epoch``, numbered from 0 as in the checkpoint
    names) and the validation metrics of that epoch to ``metrics``; returns (trained, best checkpoint path)."""
    trained = trains(cfg, module)
    # a run restarted in its folder (fixed hydra.run.dir, a requeued SLURM job) goes on from its last checkpoint
    ckpt = cfg.get("ckpt_path")
    if not ckpt and cfg.get("auto_resume") and trained:
        ckpt = scale.resume_checkpoint(Path(cfg.paths.output_dir), cfg)
    t0 = time.time()
    if trained:
        if ckpt:
            scale.load_checkpoint(ckpt)  # a clear error for a cut-short or unsafe file, before Lightning reads it
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        if trainer.global_step == 0:  # nothing trained: no metrics claim it was, nothing exported over a good adapter
            raise UserError(
                "training took no optimizer step (trainer.max_steps / limit_train_batches / data sizes leave no "
                "batch): nothing is reported or exported; check trainer.limit_train_batches, trainer.max_steps and "
                "the data.* sizes, or use trainer.max_epochs=0 for a zero-shot run")
    timer = next((c for c in trainer.callbacks if isinstance(c, scale.ResumeState)), None)
    metrics["time/train_s"] = round(timer.train_seconds() if trained and timer else time.time() - t0, 3)
    if trained:  # epochs run (early stopping may end before max_epochs) and the one selected: epochs/s, cost
        metrics["train/epochs"] = trainer.current_epoch
        selected = module.best_epoch(cfg.optimized_metric)
        if selected is not None:
            metrics["train/best_epoch"] = selected
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trained else ""
    if trained and best:
        metrics.update(module.best_val_metrics(cfg.optimized_metric))
    else:
        metrics.update(_floats(trainer.validate(module, datamodule=dm, verbose=False)[0]))
    return trained, best


def catalogue_metrics(options, module: RecModule, dm: RecDataModule, out_dir: Path | None, seed: int,
                      splits: tuple[str, ...]) -> dict:
    """``eval.candidates=full``: the full-catalogue metrics of ``splits`` (and ranks, retrieved.npz in
    ``out_dir``, ``recsys.evaluation.catalogue``); nothing with ``sampled``."""
    options = options or {}
    if (options.get("candidates") or "sampled") != "full":
        return {}
    from recsys.evaluation import catalogue

    return catalogue.evaluate(module, dm, out_dir, seed, int(options.get("retrieve_k") or 20), splits)


def best_test_metrics(cfg: DictConfig, trainer: L.Trainer, module: RecModule, dm: RecDataModule, best: str) -> dict:
    """Test metrics of the best checkpoint (or the module as it is), the data sizes and the reference rows."""
    t0 = time.time()
    if best:
        scale.load_checkpoint(best)
    metrics = _floats(trainer.test(module, datamodule=dm, ckpt_path=best or None, verbose=False, weights_only=True)[0])
    out_dir = Path(cfg.paths.output_dir) if trainer.is_global_zero else None
    metrics.update(catalogue_metrics(cfg.get("eval"), module, dm, out_dir, cfg.seed, ("val", "test")))
    metrics["time/test_s"] = round(time.time() - t0, 3)
    metrics["data/test_examples"] = len(dm.eval_sets["test"])
    metrics["data/train_examples"] = sum(len(v) for v in dm.train_entries.values())
    for row, values in dm.reference_metrics("test").items():
        metrics.update({f"{row}/test/{k}": v for k, v in values.items()})
    return metrics


def report_and_export(cfg: DictConfig, trainer: L.Trainer, module: RecModule, store: AdapterStore, metrics: dict,
                      best: str, trained: bool) -> None:
    """metrics.json, run.json, the results table, the adapter export and the loggers' records (rank 0)."""
    out_dir = Path(cfg.paths.output_dir)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "run.json", {"best_checkpoint": best, "trained": trained, "complete": False})
    title = f"{cfg.method.name} on {cfg.data.target} ({cfg.backbone.name}, seed {cfg.seed})"
    write_text(out_dir / "results.txt", results_table(metrics, title))
    collapsed = sorted(k for k, v in metrics.items() if k.endswith("/collapsed") and v)
    if trained and exports(cfg) and collapsed and not force_export(cfg):
        log.warning("not exported: the training loss stayed at chance (%s), a model that learned nothing is not stored; "
                    "export_adapter=force stores it anyway", ", ".join(collapsed))
    elif trained and exports(cfg):
        if sweeps.in_search():  # a trial exports into its own folder; the search's end keeps the best trial's
            store = sweeps.trial_store(out_dir, store, cfg.optimized_metric, metrics.get(cfg.optimized_metric, math.nan))
        folder = module.export(store, manifest=adapter_store.run_record(
            cfg.method.name, cfg.data.target, OmegaConf.to_container(cfg.data, resolve=True), cfg.seed, metrics,
            str(out_dir), str(cfg.trainer.precision)))
        if folder:
            log.info("adapter exported to %s", folder)
            tracking.log_adapter(trainer.loggers, folder)
    tracking.log_results(trainer.loggers, metrics, "test", REPORT_KEYS)
    tracking.log_best(trainer.loggers, metrics, cfg.optimized_metric, metrics.get("train/best_epoch"))
    # last: a re-run of this folder reports these figures and changes nothing (completed_metrics)
    write_json(out_dir / "run.json", {"best_checkpoint": best, "trained": trained, "complete": True})
    for lg in trainer.loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if "/" in k}, step=trainer.global_step)
        lg.finalize("success")


def user_error(e: BaseException) -> UserError | None:
    """The UserError behind ``e`` (hydra's ``instantiate`` wraps it in an InstantiationException), if any."""
    while e is not None and not isinstance(e, UserError):
        e = e.__cause__
    return e


def guarded(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; in a multirun a failed job writes ``failed.json`` and returns NaN instead of
    taking the other jobs down. Under a search sweeper (Optuna) it raises after writing failed.json:
    the sweeper marks the trial failed and goes on (a NaN would stop the search: optuna 2.10 refuses it)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        multirun = False
    search = sweeps.in_search()
    try:
        with scale.job_scope():  # DDP ranks run this job in its folder; no process group outlives it
            return fn(cfg)
    except Exception as e:
        if not multirun:
            user = user_error(e)
            if user is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
                print(f"error: {user}", file=sys.stderr)  # one line naming the key or file and the fix; no traceback
                raise SystemExit(1) from None
            raise
        log.exception("job failed")
        write_json(Path(cfg.paths.output_dir) / "failed.json",
                   {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        if search:
            raise
        return math.nan, {}
    finally:
        tracking.finish_run()


# ---------------------------------------------------------------------------------------------- evaluate
def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that model selection chose in a train.py run folder (not ``last.ckpt``), always
    inside ``run_dir`` (a copied folder scores its own checkpoint); UserError if run.json names one that is
    not there."""
    info = run_dir / "run.json"
    if info.is_file():
        best = read_json(info, RUN_JSON_FIX).get("best_checkpoint")
        if best:
            mine = run_dir / "checkpoints" / Path(best).name
            if not mine.is_file():
                raise UserError(f"{mine} is missing: {info} names it as the run's best checkpoint. Copy the run "
                                "folder with its checkpoints/, or pass a checkpoint with ckpt_path=")
            return mine
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else None


def evaluated_config(cfg: DictConfig) -> tuple[DictConfig, Path | None]:
    """The config of what ``evaluate.py`` scores (a ``run_dir``'s own, or ``cfg`` itself) and the checkpoint to
    load (``ckpt_path``, or the run's best); UserError for a folder that is not a finished run's."""
    ckpt, run_cfg = cfg.get("ckpt_path"), cfg
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
        saved = run_dir / ".hydra" / "config.yaml"
        if not saved.is_file():
            raise UserError(f"run_dir={run_dir} has no .hydra/config.yaml: is it a train.py run folder?")
        trained_cfg = OmegaConf.load(saved)
        run_cfg = OmegaConf.merge(trained_cfg, evaluation_overrides(cfg, trained_cfg))
        ckpt = ckpt or best_checkpoint(run_dir)
        info = run_dir / "run.json"
        trained = read_json(info, RUN_JSON_FIX).get("trained", True) if info.is_file() else True
        if ckpt is None and trained:  # a run with nothing trained (merge_sources) is rebuilt from its config
            raise UserError(f"{run_dir}/checkpoints holds no checkpoint to evaluate")
    return run_cfg, (Path(ckpt) if ckpt else None)


def evaluation_overrides(cfg: DictConfig, saved: DictConfig) -> dict:
    """What ``evaluate.py`` (``cfg``) changes in a trained run's config (``saved``): its own output folder
    (``paths``), and the protocol or candidates it asks for."""
    own: dict = {"paths": cfg.paths, "data": {}}  # this evaluation's own output folder
    if "collection" not in saved.data:  # a run from before data.collection: its store had no collection level
        own["data"]["collection"] = ""
    if cfg.get("protocol") == "paper":  # evaluate.py protocol=paper on a run folder
        own["data"].update(protocol="paper", num_negatives=cfg.data.num_negatives, paper=cfg.data.paper)
    if cfg.data.get("candidates") == "retrieved":  # a run folder re-ranking a retriever's top K
        own["data"].update(candidates="retrieved", retriever=cfg.data.retriever, retrieve_k=cfg.data.get("retrieve_k"))
    return own


def adapter_module(cfg: DictConfig, run_cfg: DictConfig, dm: RecDataModule):
    """``evaluate.py adapter=<folder>``: the LoRA module that training built, from the stored adapter."""
    cls, kwargs = method_class(run_cfg)
    if cls.kind != "lora":
        able = [name for name, c in method_classes().items() if c.kind == "lora"]
        raise UserError(f"adapter= evaluates a LoRA adapter folder: use method= one of {able} (or run_dir= for "
                        f"{cls.name or cls.__name__})")
    folder = AdapterStore.resolve(cfg.adapter, run_cfg.seed)
    AdapterStore.verify(folder)  # before the backbone loads
    if (folder / adapter_store.MANIFEST).is_file():  # trained on this data?
        why = run_store(run_cfg, dm).data_problem(folder, AdapterStore.load_manifest(folder))
        if why:
            raise adapter_store.StoreError(why)
    backbone = build_backbone(run_cfg)
    module = cls.from_adapter(backbone, folder, str(run_cfg.trainer.precision), **kwargs)
    attach_backbone(run_cfg, dm, backbone, scoring=module.scoring)
    if dm.protocol == "paper":
        module.enable_paper_protocol(dm.paper_prompt())
    return module


def eval_trainer(cfg: DictConfig, run_cfg: DictConfig) -> tuple[L.Trainer, DictConfig]:
    """This evaluation's trainer and loggers (eval.yaml: none by default), named after the evaluated run's
    method and data; returns the trainer and the config its loggers record."""
    own = OmegaConf.to_container(cfg, resolve=False)
    log_cfg = OmegaConf.merge(run_cfg, {k: own[k] for k in ("logger", "job_type", "tags", "group", "run_name")
                                        if k in own and (k in ("logger", "job_type") or k not in run_cfg)})
    loggers = [hydra.utils.instantiate(c) for c in (log_cfg.get("logger") or {}).values() if c]
    writer = tracking.RankWriter(cfg.paths.output_dir)  # ranks.csv.gz of this evaluation
    return hydra.utils.instantiate(run_cfg.trainer, callbacks=[writer], logger=loggers or False, max_epochs=0), log_cfg


def evaluate(cfg: DictConfig) -> tuple[float, dict]:
    """Score a trained run (``run_dir``), a checkpoint (``ckpt_path``) or a stored adapter (``adapter``)
    on the validation or test split with the same fixed candidates, in the module training built; writes
    metrics.json."""
    split = cfg.split
    if split not in ("val", "test"):
        raise UserError(f"split={split!r}: use val or test")
    checks.eval_options(cfg)
    run_cfg, ckpt = evaluated_config(cfg)
    if ckpt:
        scale.load_checkpoint(ckpt)  # a clear error for a cut-short or unsafe file, before anything heavy
    dm = checks.config(run_cfg)  # every setting checked (recsys.pipeline.checks), before anything heavy loads
    dm.load_domains()
    checks.data(dm)
    L.seed_everything(run_cfg.seed, workers=True)
    if cfg.get("adapter"):
        module = adapter_module(cfg, run_cfg, dm)
    else:
        backbone = build_backbone(run_cfg) if method_class(run_cfg)[0].needs_backbone else None
        attach_backbone(run_cfg, dm, backbone)
        module = build_module(run_cfg, backbone, dm, run_store(run_cfg, dm))
    speed.apply(module, cfg.get("speed"))
    trainer, log_cfg = eval_trainer(cfg, run_cfg)
    tracking.log_hyperparameters(trainer.loggers, log_cfg, {"params/total": sum(p.numel() for p in module.parameters())})
    dm.prepare_data()
    dm.setup("test")
    run = trainer.validate if split == "val" else trainer.test
    metrics = _floats(run(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None, verbose=False,
                          weights_only=True)[0])
    own = {k: v for k, v in (cfg.get("eval") or {}).items() if v is not None}  # evaluate.py's, else the run's
    metrics.update(catalogue_metrics({**(run_cfg.get("eval") or {}), **own}, module, dm,
                                     Path(cfg.paths.output_dir) if trainer.is_global_zero else None, run_cfg.seed, (split,)))
    for row, values in dm.reference_metrics(split).items():
        metrics.update({f"{row}/{split}/{k}": v for k, v in values.items()})
    if trainer.is_global_zero:
        write_results(trainer, cfg, metrics, f"evaluate {run_cfg.method.name} on {run_cfg.data.target}", split,
                      module.input_adapters())
    return float(metrics.get(f"{split}/ndcg@10", math.nan)), metrics


def write_results(trainer: L.Trainer, cfg: DictConfig, metrics: dict, title: str, split: str,
                  inputs: list[Path]) -> None:
    """An evaluation's metrics.json, results table and logger records (``inputs``: the adapters it read)."""
    out_dir = Path(cfg.paths.output_dir)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "results.txt", results_table(metrics, title, split))
    tracking.use_adapters(trainer.loggers, inputs)
    tracking.log_results(trainer.loggers, metrics, split, REPORT_KEYS)
    for lg in trainer.loggers:
        lg.log_metrics(metrics)
        lg.finalize("success")
