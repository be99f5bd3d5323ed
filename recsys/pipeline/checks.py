"""Every setting checked before anything heavy loads, in two passes (docs/reliability.md, "Settings checked
before loading").

1. ``config(cfg)``: the composed config, read nothing but folder names: the seed, the recipe (``Recipe``), the
   trainer's precision, ``eval``, ``protocol``, the data settings (``recsys.data.settings``, whose typed
   dataclasses hold the ranges and choices), the folders they name (``data.root``, ``data.retriever``), the
   merge settings (``MergeSettings``) and the method's own keys (``RecModule.check``). Returns the DataModule.
2. ``data(dm)``: the domains as read, before the backbone loads: enough items for the negatives, users left.

Each failure is one UserError line naming the key as the user wrote it and what is allowed.
"""

from __future__ import annotations

import typing
from pathlib import Path

from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR
from omegaconf import DictConfig, OmegaConf

from recsys.core.errors import UserError, checked, require
from recsys.data.datamodule import RecDataModule
from recsys.data.domain import DataError, Domain
from recsys.data.retrieval import RETRIEVED
from recsys.data.settings import MIXES, PROTOCOLS
from recsys.methods.base import Recipe, RunInfo, method_classes, paper_protocol_error
from recsys.models.merging import MergeSettings
from recsys.pipeline.scale import sharded_loading
from recsys.pipeline.stages import PIPELINE_KEYS, method_class

PRECISIONS = (*typing.get_args(_PRECISION_INPUT_STR), *map(str, typing.get_args(_PRECISION_INPUT_INT)))
EVAL_CANDIDATES = ("sampled", "full")  # eval.candidates (recsys.evaluation.catalogue)
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are uint32


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def config(cfg: DictConfig) -> RecDataModule:
    """The first pass (see the module docstring): the DataModule of these settings, or one UserError line."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed!r} must be an integer in [0, {MAX_SEED}]")
    require("seed", cfg.seed, at_least=0, at_most=MAX_SEED)
    if "recipe" in cfg:  # typed: a typo'd key, a wrong type or a value out of range fails now
        checked(Recipe, _plain(cfg.recipe), "recipe")
    if "trainer" in cfg:
        require("trainer.precision", str(cfg.trainer.get("precision", "32-true")), choices=PRECISIONS)
    eval_options(cfg)
    require("protocol", cfg.get("protocol"), choices=PROTOCOLS)
    require("method.mix", cfg.method.get("mix", "target"), choices=MIXES)
    dm = RecDataModule.from_config(_plain(cfg.data), mix=cfg.method.get("mix", "target"), seed=cfg.seed)
    folders(dm)
    if cfg.get("merge") is not None:
        MergeSettings.of(_plain(cfg.merge))
    method(cfg, dm)
    return dm


def eval_options(cfg: DictConfig) -> None:
    """``eval.candidates`` and ``eval.retrieve_k`` (train.py's, and evaluate.py's own)."""
    options = _plain(cfg.get("eval")) or {}
    require("eval.candidates", options.get("candidates"), choices=EVAL_CANDIDATES)
    require("eval.retrieve_k", options.get("retrieve_k"), at_least=1)


def folders(dm: RecDataModule) -> None:
    """The folders the data settings name: ``data.root``, and the retriever run of retrieved candidates."""
    root = dm.domain_settings.root
    if root is not None and not Path(root).is_dir():
        raise DataError(f"data.root={root} is not a folder: point it at the folder holding one sub-folder a domain "
                        "(items.jsonl, sequences.jsonl), or set RECSYS_DATA")
    c = dm.candidate_settings
    if c.retrieves and not (Path(c.retriever) / RETRIEVED).is_file():
        raise DataError(f"data.retriever={c.retriever} holds no {RETRIEVED}: point it at a retriever run folder "
                        f"(e.g. python train.py method=sasrec data.target={dm.target}, which stores its top K)")


def method(cfg: DictConfig, dm: RecDataModule) -> None:
    """The method's own keys (``RecModule.check``) and what the protocol asks of it."""

    cls, kwargs = method_class(cfg)
    if dm.protocol == "paper" and not cls.one_language_model:
        raise UserError(paper_protocol_error(cls))
    if dm.protocol == "paper" and kwargs.get("scoring", "head") != "likelihood":
        raise UserError("protocol=paper ranks by likelihood and generates: set method.module.scoring=likelihood "
                        "(and a decoder backbone)")
    if sharded_loading(cfg):
        sharded(cfg, cls, dm.protocol)
    run = RunInfo(target=dm.target, sources=tuple(dm.sources), mix=dm.mix, seed=dm.seed,
                  data=_plain(cfg.data), monitor=cfg.get("optimized_metric") or "val/ndcg@10")
    cls.check(run, **{k: v for k, v in kwargs.items() if k not in PIPELINE_KEYS})


def sharded(cfg: DictConfig, cls, protocol: str) -> None:
    """``trainer=fsdp2`` (each rank reads its shard of the backbone, ``RecModule.configure_model``): a method that
    supports it, a backbone read from safetensors, the ranking protocol (train.py and ``recsys.plan`` both ask)."""
    able = sorted(n for n, c in method_classes().items() if getattr(c, "loads_sharded", False))
    if not getattr(cls, "loads_sharded", False):
        raise UserError(f"trainer=fsdp2 does not support method={cls.name or cls.__name__} yet (only "
                        f"{', '.join(able)}): use trainer=fsdp for it (every rank loads the whole backbone first)")
    name = str(cfg.backbone.name)
    if name.startswith(("tiny:", "embedded:")):
        raise UserError(f"trainer=fsdp2 reads the backbone's safetensors shard by shard: backbone.name={name} is "
                        "built in, with none; use backbone=hf backbone.name=<a hub name or save_pretrained folder> "
                        "(or a preset such as backbone=qwen2_7b_instruct), or trainer=ddp for this backbone")
    if protocol == "paper":
        raise UserError("trainer=fsdp2 supports protocol=ranking only (protocol=paper generates with the whole "
                        "model): use trainer=fsdp with protocol=paper")


def most_negatives(domain: Domain) -> int:
    """The most negatives every user of ``domain`` can have: items outside the longest sequence."""
    return domain.num_items - max((len(set(s)) for s in domain.sequences), default=0)


def data(dm: RecDataModule) -> None:
    """The second pass, over the domains as read (``dm.load_domains()``), before the backbone loads."""
    c = dm.candidate_settings
    for name in dm.used_domains:
        d = dm.domains[name]
        key = "data.target" if name == dm.target else "data.sources"
        if d.num_users < 2:
            raise DataError(f"{key}: domain {name!r} has {d.num_users} user(s) left after reading, a run needs at "
                            "least 2 (check its sequences file and data.k_core, or pick another domain)")
        trains = name == dm.target or dm.mix != "target"
        if trains and not any(len(seq) >= 4 for seq in d.sequences):
            raise DataError(f"{key}: domain {name!r} has no user with 4 or more items left after reading: no training "
                            "example (the last two items of a user are for validation and test)")
        most = most_negatives(d)
        wants = [("data.num_train_negatives", c.num_train_negatives)]
        if name == dm.target and c.candidates == "sampled":
            wants.append(("data.num_negatives", c.num_negatives))
        for key, k in wants:
            if k > most:
                raise DataError(f"{key}={k} is more than domain {name!r} allows: it has {d.num_items} items and a user "
                                f"with {d.num_items - most}, leaving {most}; use {key} <= {most}")
