"""The stages before a method is built: the stored adapters it needs are found, checked, and the missing
ones trained (RecBole-CDR's idea: the pipeline runs a multi-stage method's stages, a method never starts a
training run itself).

A method class declares what it needs (``RecModule.required_adapters(run, backbone, **kwargs)`` ->
``AdapterSpec`` list); :func:`provide` looks each up in the store, counts one that is absent, incomplete or
does not fit the run (``adapter_store.mismatch``) as missing, trains the missing ones with ``method=lora``
when ``method.module.train_missing`` is set (its method config composed with Hydra's compose API, so a
user's own config folder is honoured), and returns ``{name: folder}`` for ``RunInfo.adapters``. A required
adapter still missing is a ``SourceAdapterError`` naming each one, why, and the command that trains it
(:func:`train_command`, the only place that command is written).

Several processes, one training of a missing adapter (:func:`train_missing_once`): the ranks of a DDP
job (SLURM starts them all at once) and the jobs of a sweep that need the same adapter. Rank 0 of a job
takes the adapter's file lock (``<store>/<backbone>/<name>/.train-seed-<s>.lock``), looks again, trains
it if it is still missing (on one process: the other ranks are not in that training) and stores it; the
other ranks poll the store until it is there (or rank 0 failed), then all read the same folder. A job
that finds the lock taken waits for the job holding it, then finds the adapter stored.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from recsys.core.errors import UserError
from recsys.core.files import write_json
from recsys.methods.base import RecModule
from recsys.models.adapter_store import (AdapterSpec, AdapterStore, SourceAdapterError, StoreError, lora_command,
                                         mismatch)
from recsys.pipeline import scale, tracking

log = logging.getLogger("recsys.pipeline.stages")

PIPELINE_KEYS = ("train_missing",)  # method.module keys the pipeline reads; the module never gets them


def method_class(cfg: DictConfig) -> tuple[type[RecModule], dict]:
    """The method's class (``method.module._target_``) and its own config keys, instantiated."""
    factory = hydra.utils.instantiate(cfg.method.module, _partial_=True, _convert_="all")
    if not isinstance(factory, partial) or not isinstance(factory.func, type) \
            or not issubclass(factory.func, RecModule):  # pragma: no cover
        raise ValueError("method.module must name a RecModule class in _target_")
    return factory.func, dict(factory.keywords)


def lookup(store: AdapterStore, backbone: str, spec: AdapterSpec) -> tuple[Path | None, str]:
    """``(folder, "")`` when ``spec``'s adapter is stored complete and fits, else ``(None, why)``. A broken
    file raises StoreError naming it (it is not silently retrained)."""
    why = store.problem(backbone, spec.name)
    if why:
        return None, why
    folder = store.path(backbone, spec.name)
    manifest = store.load_manifest(folder)
    other_data = store.data_problem(folder, manifest)
    if other_data:  # never fused silently, nor silently retrained over: the user decides
        raise StoreError(other_data)
    why = mismatch(manifest, spec.expect, strict=spec.strict)
    return (None, f"{folder} was {why}") if why else (folder, "")


def provide(cfg: DictConfig, specs: list[AdapterSpec], backbone: str, store: AdapterStore,
            train_missing: bool, train: Callable[[DictConfig], object]) -> tuple[dict[str, Path], dict[str, str]]:
    """``(found, missing)``: the folders of ``specs``' adapters (name -> folder), after training the missing
    trainable ones with ``train`` when ``train_missing``, and why each optional one is not there (name ->
    reason); SourceAdapterError for a required one still missing."""
    found, missing = _find(specs, backbone, store)
    todo = [s.name for s in specs if s.name in missing and s.trainable and not s.optional]
    if todo and train_missing:
        train_missing_once(cfg, [s for s in specs if s.name in todo], backbone, store, train)
        found, missing = _find(specs, backbone, store)
    required = {s.name: missing[s.name] for s in specs if s.name in missing and not s.optional}
    if required:
        lines = "\n".join(f"  {n!r} ({why}): {train_command(cfg, n)}" for n, why in required.items())
        raise SourceAdapterError(
            f"missing source adapters for {list(required)} in {store.root}/ (backbone {backbone}, seed {store.seed}); "
            f"produce each with its command:\n{lines}\nor set method.module.train_missing=true to train them first.")
    return found, {n: why for n, why in missing.items() if n not in required}


def _find(specs: list[AdapterSpec], backbone: str, store: AdapterStore) -> tuple[dict, dict]:
    found, missing = {}, {}
    for spec in specs:
        folder, why = lookup(store, backbone, spec)
        if folder is not None:
            found[spec.name] = folder
        else:
            missing[spec.name] = why
    return found, missing


STAGE_FAILED = "stage_failed.json"  # rank 0 could not train a missing adapter: the waiting ranks stop too


def train_missing_once(cfg: DictConfig, specs: list[AdapterSpec], backbone: str, store: AdapterStore,
                       train: Callable[[DictConfig], object], poll_s: float = 2.0) -> None:
    """Train each of ``specs`` (missing adapters) once however many processes need it: rank 0 of this job
    trains it under the adapter's file lock unless another job stored it meanwhile; the other ranks wait
    (:func:`wait_for_adapters`)."""
    if scale.global_rank() != 0:
        wait_for_adapters(cfg, specs, backbone, store, poll_s)
        return
    for spec in specs:
        lock = store.backbone_dir(backbone) / spec.name / f".train-seed-{store.seed}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            if lookup(store, backbone, spec)[0] is not None:  # another job stored it while this one waited
                log.info("source adapter %s: stored by another job meanwhile, read from the store", spec.name)
                continue
            try:
                train_source_adapters(cfg, [spec.name], train)
            except BaseException as e:
                write_json(Path(cfg.paths.output_dir) / STAGE_FAILED, {"adapter": spec.name, "error": repr(e)})
                raise


def wait_for_adapters(cfg: DictConfig, specs: list[AdapterSpec], backbone: str, store: AdapterStore,
                      poll_s: float) -> None:
    """A rank other than 0: wait until rank 0 stored ``specs`` (SourceAdapterError if it failed). USR1 (the
    requeue signal) is ignored meanwhile: rank 0's training checkpoints and requeues the job."""
    failed = [Path(cfg.paths.output_dir) / f for f in (STAGE_FAILED, "failed.json")]
    log.info("rank %d: waiting for rank 0 to train %s", scale.global_rank(), [s.name for s in specs])
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        while _find(specs, backbone, store)[1]:
            if any(f.is_file() for f in failed):
                raise SourceAdapterError(f"rank 0 failed to train the source adapters {[s.name for s in specs]} "
                                         f"(see {cfg.paths.output_dir}/train.log)")
            time.sleep(poll_s)
    finally:
        signal.signal(signal.SIGUSR1, before)


def lora_method() -> DictConfig:
    """``method=lora``'s config node, composed by Hydra from the config search path (the package's
    ``conf/`` and a user's config folder), with its interpolations left to the run's config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from recsys import CONFIG_DIR

    if GlobalHydra.instance().is_initialized():  # inside train.py's Hydra app (or a test's compose)
        return compose(config_name="train", overrides=["method=lora"]).method
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["method=lora"]).method


def train_source_adapters(cfg: DictConfig, sources: list[str], train: Callable[[DictConfig], object]) -> None:
    """Train ``method=lora`` on each of ``sources`` with this run's backbone, data and trainer (on one process),
    on all of the domain's data (``data.target_fraction`` is the calling run's target share only); each run's
    folder is ``<run>/sources/<source>``, each a wandb run of its own in the caller's group (job type
    ``source-adapter``). The random generators are put back afterwards, so the caller goes on as it would
    have with the adapters stored (the same initialisation, dropout masks and results)."""
    lora = lora_method()
    with kept_rng_state():
        _train_each(cfg, sources, lora, train)


@contextmanager
def kept_rng_state():
    """The random generators' states (torch, CUDA, numpy, python) as they were on entering, on leaving."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def force_export(cfg: DictConfig) -> bool:
    """``export_adapter=force``: export even a collapsed run, even over a stored adapter of better validation."""
    return str(cfg.get("export_adapter")).lower() == "force"


def exports(cfg: DictConfig) -> bool:
    """Whether this run writes its adapter to the store (``export_adapter``: true, false or force)."""
    value = str(cfg.get("export_adapter")).lower()
    if value not in ("true", "false", "force"):
        raise UserError(f"export_adapter={cfg.get('export_adapter')!r}: use true, false or force (force: replace a "
                        "stored adapter even of better validation)")
    return value != "false" and bool(cfg.method.get("export", False))


def _train_each(cfg: DictConfig, sources: list[str], lora: DictConfig, train: Callable[[DictConfig], object]) -> None:
    for s in sources:
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        sub.method = lora
        sub.data.target, sub.data.sources, sub.data.target_fraction = s, [], 1.0
        sub.paths.output_dir = str(Path(cfg.paths.output_dir) / "sources" / s)
        sub.zero_shot, sub.ckpt_path = False, None
        sub.export_adapter = "force" if force_export(cfg) else True
        sub.group, sub.job_type = cfg.group, "source-adapter"  # the caller's group, resolved before method changes
        sub.run_name = f"{cfg.run_name}-source-{s}"
        one_process(sub)
        log.info("training the missing source adapter %s", s)
        tracking.finish_run()  # the caller's wandb run, if any, is not this training's
        try:
            train(sub)
        finally:
            tracking.finish_run()  # this training's wandb run ends here: the next training starts its own


def one_process(sub: DictConfig) -> None:
    """``sub.trainer`` on one process: a source adapter is trained by rank 0 alone while the job's other ranks
    wait (in a SLURM job of N tasks, Lightning's SLURM environment is replaced by a one-process one)."""
    sub.trainer.devices, sub.trainer.num_nodes, sub.trainer.strategy = 1, 1, "auto"
    sub.trainer.pop("sync_batchnorm", None)
    if scale.slurm_plugins():
        sub.trainer.plugins = [{"_target_": "lightning.fabric.plugins.environments.LightningEnvironment"}]


# command-line overrides that a source's command must not copy: they describe the calling run's target
_NOT_FOR_SOURCES = ("data.target", "data.sources", "data.target_fraction")
_PATHS_FOR_SOURCES = ("paths.root_dir", "paths.adapter_store", "paths.cache_dir")


def _hydra_choices() -> tuple[Mapping, list[str]]:
    from hydra.core.hydra_config import HydraConfig

    try:
        hc = HydraConfig.get()
        return hc.runtime.choices, list(hc.overrides.task)
    except ValueError:  # not inside a Hydra app (tests compose the config themselves)
        return {}, []


def train_command(cfg: DictConfig | None, domain: str) -> str:
    """The ``python train.py ...`` command that trains and stores ``domain``'s LoRA adapter with this run's
    settings: ``method.source_experiment`` (the LoRA preset the sources come from, if any), backbone, data
    config, the ``data.*`` and store/cache ``paths.*`` overrides of this run's command line, and its seed
    (``adapter_store.lora_command`` writes it)."""
    if cfg is None:
        return lora_command(domain)
    choices, task = _hydra_choices()
    experiment = cfg.method.get("source_experiment")
    before = [f"experiment={experiment}"] if experiment else []
    options = [f"{group}={choices[group]}" for group in ("backbone", "data") if choices.get(group)]
    if cfg.data.get("root"):
        options.append(f"data.root={cfg.data.root}")
    for o in task:  # this run's data settings, and where its adapter store (and caches) are
        key = o.lstrip("+~").split("=", 1)[0]
        if key.startswith("data.") and key not in _NOT_FOR_SOURCES and not key.startswith("data.root"):
            options.append(o)
        elif key in _PATHS_FOR_SOURCES:
            options.append(o)
    return lora_command(domain, cfg.seed, before, options)
