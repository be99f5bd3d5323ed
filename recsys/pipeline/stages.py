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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from recsys.methods.base import RecModule

from recsys.models.adapter_store import AdapterSpec, AdapterStore, SourceAdapterError, lora_command, mismatch

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
    why = mismatch(store.load_manifest(folder), spec.expect, strict=spec.strict)
    return (None, f"{folder} was {why}") if why else (folder, "")


def provide(cfg: DictConfig, specs: list[AdapterSpec], backbone: str, store: AdapterStore,
            train_missing: bool, train: Callable[[DictConfig], object]) -> tuple[dict[str, Path], dict[str, str]]:
    """``(found, missing)``: the folders of ``specs``' adapters (name -> folder), after training the missing
    trainable ones with ``train`` when ``train_missing``, and why each optional one is not there (name ->
    reason); SourceAdapterError for a required one still missing."""
    found, missing = _find(specs, backbone, store)
    todo = [s.name for s in specs if s.name in missing and s.trainable and not s.optional]
    if todo and train_missing:
        train_source_adapters(cfg, todo, train)
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
    """Train ``method=lora`` on each of ``sources`` with this run's backbone, data and trainer, on all of the
    domain's data (``data.target_fraction`` is the calling run's target share only); each run's folder is
    ``<run>/sources/<source>``. Reseeds afterwards, so the caller starts as it would with stored adapters."""
    lora = lora_method()
    for s in sources:
        sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        sub.method = lora
        sub.data.target, sub.data.sources, sub.data.target_fraction = s, [], 1.0
        sub.paths.output_dir = str(Path(cfg.paths.output_dir) / "sources" / s)
        sub.zero_shot, sub.export_adapter, sub.ckpt_path = False, True, None
        log.info("training the missing source adapter %s", s)
        train(sub)
    L.seed_everything(cfg.seed, workers=True)


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
