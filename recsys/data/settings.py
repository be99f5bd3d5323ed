"""The DataModule's typed settings: which domains and examples (``DomainSettings``), which candidates
(``CandidateSettings``), how batches are made (``BatchSettings``), and the prompts (``PromptTemplate``,
``PaperTemplate``). Each is a frozen dataclass checked by ``recsys.core.errors.checked``: a typo'd key, a
wrong type, a value out of range or not among the choices is one ``DataError`` naming ``data.<key>`` and
what is allowed, before anything is read.

``from_config`` splits the ``data`` config as users write it (``conf/data/*.yaml``, flat keys) into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from recsys.core.errors import checked, require, setting
from recsys.data.candidates import SAMPLING
from recsys.data.domain import DataError
from recsys.data.paper_prompt import PaperTemplate
from recsys.data.text import PromptTemplate

MIXES = ("target", "joint", "hybrid")
PROTOCOLS = ("ranking", "paper")  # our candidate ranking | WeaveRec's released prompt (recsys/data/paper_prompt.py)
CANDIDATES = ("sampled", "retrieved")  # evaluation candidates (recsys.data.candidates | recsys.data.retrieval)
TRAIN_NEGATIVES = ("sampled", "retrieved")  # training negatives: fresh draws | the retriever's top K (hard)
PLAIN_FILES = ("items.jsonl", "sequences.jsonl")  # what makes a folder a plain-format domain (readers.read_plain)
# data keys the DataModule does not take because other config nodes read them: ``collection`` names the adapter
# store (paths.adapter_store), ``year`` and ``k_core`` are interpolated into conf/data/raw.yaml's domain specs,
# ``_target_`` is in the saved configs of runs from before these settings
READ_ELSEWHERE = ("collection", "year", "k_core", "_target_")


def plain_domains(root: str | Path | None) -> dict[str, dict]:
    """The plain-format domains under ``root``: ``{name: {source: plain, path}}`` for each sub-folder that
    holds items.jsonl and sequences.jsonl (``data.root``: a folder of your own domains just works)."""
    if not root or not Path(root).is_dir():
        return {}
    return {p.name: {"source": "plain", "path": str(p)} for p in sorted(Path(root).iterdir())
            if p.is_dir() and all((p / f).is_file() for f in PLAIN_FILES)}


@dataclass(frozen=True)
class DomainSettings:
    """Which domains are read and which of their examples train and evaluate (``recsys.data.selection``).

    ``domains``: name -> spec (``source`` and its settings), plus the plain domains found under ``root``
    (the config's own specs win); ``target``, ``sources``: domain names; ``mix``: target | joint | hybrid
    (``hybrid_cap`` examples a side); ``target_fraction``: share of the target's training users kept;
    ``max_eval_users``, ``max_train_examples``: seeded subsets (None: all); ``cap_scales_with_fraction``: the
    target's cap is ``target_fraction * max_train_examples``; ``train_on_val``: train on validation examples
    too, selecting the model on a held-out ``selection_share`` of the users; ``seed``: every draw's seed.
    """

    target: str
    domains: Mapping[str, Any] = setting(factory=dict)
    root: str | None = None
    cache_dir: str | None = None  # processed raw dumps are cached here
    sources: tuple[str, ...] = setting(factory=tuple)
    mix: str = setting("target", choices=MIXES)
    target_fraction: float = setting(1.0, above=0, at_most=1)
    hybrid_cap: int = setting(40_000, at_least=1)
    max_history: int = setting(10, at_least=1)
    max_eval_users: int | None = setting(None, at_least=1)
    max_train_examples: int | None = setting(None, at_least=1)
    cap_scales_with_fraction: bool = False
    train_on_val: bool = False
    selection_share: float = 0.02
    seed: int = setting(0, at_least=0)

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        known = sorted(self.specs)
        for key, name in [("data.target", self.target)] + [("data.sources", s) for s in self.sources]:
            if name not in self.specs:
                raise DataError(f"{key}: unknown domain {name!r}; the data config defines {known}"
                                + (f" (with the plain domains found under data.root={self.root})" if self.root else ""))
        if self.target in self.sources:
            raise DataError(f"data.sources={list(self.sources)} lists the target {self.target!r}: a target cannot be "
                            "its own source; remove it from data.sources")
        if len(set(self.sources)) != len(self.sources):
            raise DataError(f"data.sources={list(self.sources)} repeats a domain")
        if self.mix in ("joint", "hybrid") and not self.sources:
            raise DataError(f"data.mix={self.mix} needs data.sources (e.g. 'data.sources=[toys]')")
        if self.train_on_val:
            require("data.selection_share", self.selection_share, DataError, above=0, below=1)

    @cached_property
    def specs(self) -> dict[str, dict]:
        """Every domain's spec: the config's, and the plain-format ones found under ``root``."""
        return {**plain_domains(self.root), **{k: dict(v or {}) for k, v in dict(self.domains).items()}}

    @property
    def used(self) -> list[str]:
        """The domains a run reads: the target, then the sources."""
        return [self.target, *self.sources]


@dataclass(frozen=True)
class CandidateSettings:
    """Candidates and negatives: ``num_negatives`` fixed evaluation negatives (``num_negatives + 1``
    candidates) or a retriever's top ``retrieve_k`` (``candidates=retrieved``, ``retriever``: its run folder);
    ``num_train_negatives`` a training example, fresh each epoch (``train_negatives=sampled``, drawn
    ``candidate_sampling``) or the retriever's hard ones; ``protocol``: ranking | paper (WeaveRec's prompt)."""

    num_negatives: int = setting(19, at_least=1)
    num_train_negatives: int = setting(4, at_least=1)
    candidate_sampling: str = setting("uniform", choices=SAMPLING)
    candidates: str = setting("sampled", choices=CANDIDATES)
    retriever: str | None = None
    retrieve_k: int | None = setting(None, at_least=1)  # None: the K the retriever stored
    train_negatives: str = setting("sampled", choices=TRAIN_NEGATIVES)
    protocol: str = setting("ranking", choices=PROTOCOLS)

    def __post_init__(self):
        for key in ("candidates", "train_negatives"):
            if getattr(self, key) == "retrieved" and not self.retriever:
                raise DataError(f"data.{key}=retrieved needs data.retriever=<a retriever run folder> "
                                "(e.g. a method=sasrec run)")
        if self.candidates == "retrieved" and self.protocol == "paper":
            raise DataError("data.candidates=retrieved works with protocol=ranking (the paper protocol needs its "
                            "target among the candidates)")

    @property
    def retrieves(self) -> bool:
        """Whether a retriever run folder is read (retrieved candidates or hard negatives)."""
        return "retrieved" in (self.candidates, self.train_negatives)


@dataclass(frozen=True)
class BatchSettings:
    """``batch_size``: training users a step over all processes; ``eval_batch_size``: evaluation users a
    batch a process; ``num_workers``: DataLoader workers; ``bucket_by_length``: length-bucketed batches."""

    batch_size: int = setting(16, at_least=1)
    eval_batch_size: int = setting(8, at_least=1)
    num_workers: int = setting(0, at_least=0)
    bucket_by_length: bool = False


GROUPS = {"domains": DomainSettings, "candidates": CandidateSettings, "batching": BatchSettings}
NESTED = {"prompt": PromptTemplate, "paper": PaperTemplate}  # data.prompt, data.paper


def from_config(data: Mapping | None = None, **given) -> dict:
    """The DataModule's arguments (``domains``, ``candidates``, ``batching``, ``prompt``, ``paper``) from the
    ``data`` config as written (flat keys, ``conf/data/*.yaml``) and ``given`` keys (the pipeline's ``seed``
    and the method's ``mix``); each checked, DataError naming ``data.<key>``."""
    values = {k: v for k, v in {**dict(data or {}), **given}.items() if k not in READ_ELSEWHERE}
    if "domains" in values and not isinstance(values["domains"], Mapping):
        raise DataError(f"data.domains={values['domains']!r} must be a mapping of name -> spec")
    if isinstance(values.get("domains"), Mapping):  # the domain specs: (also) the group's own field name
        values["domains"] = dict(values["domains"])
    known = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}
    unknown = sorted(set(values) - set(known) - set(NESTED))
    if unknown:
        raise DataError(f"data has unknown keys {unknown}: known are {sorted([*known, *NESTED, *READ_ELSEWHERE])}")
    if values.get("target") is None:
        raise DataError("data.target is not set: name the target domain, e.g. data.target=beauty")
    out = {group: checked(cls, {k: v for k, v in values.items() if known.get(k) == group}, "data", DataError)
           for group, cls in GROUPS.items()}
    out.update({k: checked(cls, values.get(k), f"data.{k}", DataError) for k, cls in NESTED.items()})
    return out
