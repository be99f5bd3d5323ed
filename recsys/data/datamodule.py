"""The one DataModule every method shares: domains, splits, candidates, mixtures and loaders.

Config (``conf/data/*.yaml``):
- ``domains``: name -> spec, each with a ``source``: ``synthetic`` (generator knobs), ``plain``
  (``path`` to a folder with items.jsonl/sequences.jsonl) or ``raw`` (``path``, ``category``,
  ``year`` in 2014/2018/2023, ``k_core``) — the official Amazon dumps;
- ``target``, ``sources``: domain names; ``target_fraction``: share of the target's training
  users kept (seeded);
- ``mix``: ``target`` (target data only), ``joint`` (target and sources pooled), ``hybrid``
  (WeaveRec: one stream per source, target and that source 50/50, ``hybrid_cap`` a side, plus
  the target-only stream).

Validation and test always use the target's fixed candidates (``recsys.data.candidates``), or with
``candidates=retrieved`` a retriever run's top K (``recsys.data.retrieval``).
Training negatives are fresh each epoch and depend only on (seed, epoch, example), so they are
the same whatever the number of workers or processes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from recsys.data import selection
from recsys.data.candidates import NegativeSampler, eval_candidates, stable_seed
from recsys.data.domain import DataError, Domain, Example
from recsys.data.paper_prompt import PaperCollator, PaperPrompt, PaperTemplate
from recsys.data.ids import IdCollator
from recsys.data.retrieval import recall as retrieval_recall
from recsys.data.retrieval import RetrievedNegatives, retrieved_candidates
from recsys.data.text import Collator, PromptTemplate, TextEncoder
from recsys.core.errors import checked
from recsys.core.metrics import reference_metrics

log = logging.getLogger("recsys.data")

MIXES = ("target", "joint", "hybrid")
PROTOCOLS = ("ranking", "paper")  # our candidate ranking | WeaveRec's released prompt (recsys/data/paper_prompt.py)
SOURCES = ("synthetic", "plain", "raw")
CANDIDATES = ("sampled", "retrieved")  # evaluation candidates (recsys.data.candidates | recsys.data.retrieval)
TRAIN_NEGATIVES = ("sampled", "retrieved")  # training negatives: fresh draws | the retriever's top K (hard)
TRAIN_EXAMPLES = ("prefixes", "sequences")  # every prefix an example | a user's prefixes a window apart
EPOCH_BATCHES = ("all", "target")  # every batch of a stream an epoch | as many as target-only training takes


PLAIN_FILES = ("items.jsonl", "sequences.jsonl")  # what makes a folder a plain-format domain (readers.read_plain)


def plain_domains(root: str | Path | None) -> dict[str, dict]:
    """The plain-format domains under ``root``: ``{name: {source: plain, path}}`` for each sub-folder that
    holds items.jsonl and sequences.jsonl (``data.root``: a folder of your own domains just works)."""
    if not root or not Path(root).is_dir():
        return {}
    return {p.name: {"source": "plain", "path": str(p)} for p in sorted(Path(root).iterdir())
            if p.is_dir() and all((p / f).is_file() for f in PLAIN_FILES)}


def load_domain(name: str, spec: dict, cache_dir: str | None = None) -> Domain:
    """Load one domain from its config spec (see the module docstring)."""
    spec = dict(spec or {})
    source = spec.pop("source", None)
    if source == "synthetic":
        from recsys.data import synthetic

        return synthetic.make_domain(spec.pop("kind", name), **spec)
    if source == "plain":
        from recsys.data.preprocess import load_plain_domain

        path = spec.get("path")
        if not path or not Path(path).is_dir():
            raise DataError(
                f"data.domains.{name}.path={path!r} is not a folder: point data.root (or the path) at a "
                "folder holding <domain>/items.jsonl and sequences.jsonl, e.g. data.root=../shared/data/amazon"
            )
        return load_plain_domain(path, name=name)
    if source == "raw":
        from recsys.data.preprocess import load_raw_domain

        missing = [k for k in ("path", "category", "year") if k not in spec]
        if missing:
            raise DataError(f"data.domains.{name} (source raw) lacks {missing}: set path, category and year")
        return load_raw_domain(
            spec["path"], spec["category"], int(spec["year"]), name=name,
            k_core=int(spec.get("k_core", 5)), cache_dir=cache_dir,
        )
    raise DataError(f"data.domains.{name}.source={source!r} is unknown: use one of {SOURCES}")


class TrainDataset(Dataset):
    """Training examples of one or more domains; indexed by ``(index, epoch)`` for fresh negatives."""

    def __init__(self, entries: list[tuple[str, Example]], samplers: dict[str, NegativeSampler],
                 num_negatives: int, seed: int):
        self.entries, self.samplers = entries, samplers
        self.num_negatives, self.seed = num_negatives, seed

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key):
        idx, epoch = key if isinstance(key, tuple) else (key, 0)
        dom, ex = self.entries[idx]
        rng = np.random.default_rng(stable_seed("train", self.seed, epoch, idx))
        cands, pos = self.samplers[dom].candidates(ex, self.num_negatives, rng)
        return dom, ex.history, cands, pos


class EvalDataset(Dataset):
    """Validation or test examples with their fixed candidates."""

    def __init__(self, domain: str, examples: list[Example], candidates: np.ndarray, target: np.ndarray):
        self.domain, self.examples, self.candidates, self.target = domain, examples, candidates, target

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        idx = key[0] if isinstance(key, tuple) else key
        return self.domain, self.examples[idx].history, self.candidates[idx].tolist(), int(self.target[idx])


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _EpochHook:
    """``EpochBatchSampler.sampler``: where Lightning's fit loop calls ``set_epoch`` each epoch."""

    def __init__(self, owner: "EpochBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class EpochBatchSampler:
    """Batches of ``(index, epoch)`` keys: seeded shuffle per epoch, sharded over processes.

    Training (``pad=True``) pads the index list so every process gets the same number of batches;
    evaluation (``pad=False``) shards without repeats, so metrics count every example once.
    With ``lengths``, examples are sorted by length inside windows of ``bucket_window`` batches
    (length-bucketed batching: less padding), and the batch order is shuffled.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, pad: bool,
                 lengths: list[int] | None = None, bucket_window: int = 50, drop_last: bool = False,
                 max_batches: int | None = None):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.max_batches = max_batches  # an epoch's first batches only (of this epoch's shuffled order)
        self.pad, self.lengths, self.bucket_window, self.drop_last = pad, lengths, bucket_window, drop_last
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches): where a resumed epoch goes on
        # Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``,
        # never on the batch sampler itself: without this hook every epoch would replay epoch 0.
        self.sampler = _EpochHook(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches: int) -> None:
        """Make the next pass over ``epoch`` skip its first ``batches`` batches (a mid-epoch resume)."""
        self.epoch, self._skip = epoch, (epoch, batches)

    def _indices(self) -> list[int]:
        rank, world = _dist()
        idx = list(range(self.n))
        if self.shuffle:
            idx = np.random.default_rng(stable_seed("order", self.seed, self.epoch)).permutation(self.n).tolist()
        if world > 1:
            if self.pad:
                total = math.ceil(self.n / world) * world
                idx = (idx * math.ceil(total / max(1, self.n)))[:total] if self.n else []
            idx = idx[rank::world]
        return idx

    def _batches(self) -> list[list[int]]:
        idx = self._indices()
        if self.lengths is not None:
            window = self.batch_size * self.bucket_window
            sorted_idx: list[int] = []
            for s in range(0, len(idx), window):
                sorted_idx += sorted(idx[s : s + window], key=lambda i: self.lengths[i])
            idx = sorted_idx
        batches = [idx[s : s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.lengths is not None and self.shuffle:
            rng = np.random.default_rng(stable_seed("buckets", self.seed, self.epoch))
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches if self.max_batches is None else batches[: self.max_batches]

    def __iter__(self):
        batches = self._batches()
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                batches = batches[self._skip[1]:]
            self._skip = None
        for b in batches:
            yield [(i, self.epoch) for i in b]

    def __len__(self) -> int:
        return len(self._batches())


class ResumableLoader(DataLoader):
    """A training DataLoader that Lightning resumes mid-epoch (its ``_Stateful`` protocol).

    ``state_dict()``, taken when a checkpoint is saved, says how many batches of the current epoch the
    loader has yielded; ``load_state_dict()`` makes the next pass over that epoch skip them, so a run
    restarted from a mid-epoch checkpoint sees the batches an uninterrupted run would have seen.
    """

    _yielded = 0

    def __iter__(self):
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self.batch_sampler):  # saved at the end of the epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        self.batch_sampler.resume(epoch, batches)


def train_options(examples: str = "prefixes", batches: str = "all") -> tuple[str, str]:
    """What an epoch trains on. ``examples``: ``prefixes`` (every leave-one-out prefix) or ``sequences`` (a
    user's prefixes ``max_history`` apart, ``selection.sequence_windows``); ``batches``: ``all`` or ``target``
    (an epoch of a pooled stream stops after as many batches as its target examples alone make, the first
    of the epoch's shuffled batches: a fresh subset of the pool each epoch, :func:`target_batches`)."""
    if examples not in TRAIN_EXAMPLES or batches not in EPOCH_BATCHES:
        raise DataError(f"training examples {examples!r} / epoch batches {batches!r}: use one of "
                        f"{TRAIN_EXAMPLES} / {EPOCH_BATCHES}")
    return examples, batches


def target_batches(dm: "RecDataModule", entries) -> int | None:
    """``epoch_batches=target``: the batches an epoch of the target's examples among ``entries`` alone makes
    (a pooled stream's cap: the same sampler over as many examples), else None."""
    if dm.epoch_batches != "target":
        return None
    n = sum(1 for dom, _ in entries if dom == dm.target)
    return len(EpochBatchSampler(n, dm.rank_batch_size(), shuffle=False, seed=0, pad=True))


def check_settings(dm: "RecDataModule") -> None:
    """Every data setting of ``dm`` checked on construction: a DataError naming the key and the fix."""
    known = sorted(dm.domain_specs)
    for key, name in [("data.target", dm.target)] + [("data.sources", s) for s in dm.sources]:
        if name not in dm.domain_specs:
            raise DataError(f"{key}: unknown domain {name!r}; the data config defines {known}"
                            + (f" (with the plain domains found under data.root={dm.root})" if dm.root else ""))
    if dm.target in dm.sources:
        raise DataError(
            f"data.sources={dm.sources} lists the target {dm.target!r}: a target cannot be its own "
            "source; remove it from data.sources"
        )
    if len(set(dm.sources)) != len(dm.sources):
        raise DataError(f"data.sources={dm.sources} repeats a domain")
    if not (0.0 < dm.target_fraction <= 1.0):
        raise DataError(f"data.target_fraction={dm.target_fraction} must be in (0, 1]")
    if dm.mix not in MIXES:
        raise DataError(f"data.mix={dm.mix!r} is unknown: use one of {MIXES}")
    if dm.mix in ("joint", "hybrid") and not dm.sources:
        raise DataError(f"data.mix={dm.mix} needs data.sources (e.g. 'data.sources=[toys]')")
    if dm.protocol not in PROTOCOLS:
        raise DataError(f"data.protocol={dm.protocol!r} is unknown: use one of {PROTOCOLS}")
    if dm.num_negatives < 1 or dm.num_train_negatives < 1:
        raise DataError("data.num_negatives and data.num_train_negatives must be >= 1")
    for key, value, least in [("batch_size", dm.batch_size, 1), ("eval_batch_size", dm.eval_batch_size, 1),
                              ("hybrid_cap", dm.hybrid_cap, 1), ("max_history", dm.max_history, 1),
                              ("num_workers", dm.num_workers, 0)]:
        if value < least:
            raise DataError(f"data.{key}={value} must be >= {least}")
    for key, value in [("max_train_examples", dm.max_train_examples), ("max_eval_users", dm.max_eval_users)]:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"data.{key}={value!r} must be null (all) or an integer >= 1")
    if dm.train_on_val and not (0.0 < dm.selection_share < 1.0):
        raise DataError(f"data.selection_share={dm.selection_share} must be in (0, 1) with data.train_on_val=true")
    if dm.candidates not in CANDIDATES:
        raise DataError(f"data.candidates={dm.candidates!r} is unknown: use one of {CANDIDATES}")
    if dm.candidates == "retrieved" and not dm.retriever:
        raise DataError("data.candidates=retrieved needs data.retriever=<a retriever run folder> (e.g. a method=sasrec run)")
    if dm.train_negatives not in TRAIN_NEGATIVES:
        raise DataError(f"data.train_negatives={dm.train_negatives!r} is unknown: use one of {TRAIN_NEGATIVES}")
    if dm.train_negatives == "retrieved" and not dm.retriever:
        raise DataError("data.train_negatives=retrieved needs data.retriever=<a retriever run folder> (e.g. a method=sasrec run)")
    if dm.candidates == "retrieved" and dm.protocol == "paper":
        raise DataError("data.candidates=retrieved works with protocol=ranking (the paper protocol needs its target among the candidates)")


class RecDataModule(L.LightningDataModule):
    """One DataModule over Amazon-like domains for every method (see the module docstring).

    Args:
        domains: name -> spec (``source`` and its settings).
        target: the target domain; ``sources``: the source domains (never the target).
        target_fraction: share of target training users kept, in (0, 1].
        mix: ``target`` | ``joint`` | ``hybrid``; ``hybrid_cap``: examples a side in a hybrid.
        max_history: most recent items kept in a history.
        num_negatives: evaluation negatives (19 -> 20 candidates); ``num_train_negatives``: per
            training example, fresh each epoch; ``candidate_sampling``: uniform | popularity.
        max_eval_users: evaluate on a seeded subset of this many users (None: all), the same
            subset for every method.
        max_train_examples: cap on training examples per domain (seeded subset; None: all).
        cap_scales_with_fraction: the target's cap is ``target_fraction * max_train_examples`` (a
            data-efficiency sweep under a budget: 25% of the data is 25% of the capped examples).
        train_on_val: train on the target's validation examples too, as WeaveRec's release does;
            model selection then uses the validation examples of a held-out ``selection_share`` of
            the users (seeded), which never train. Off by default (docs/methods.md, differences).
        prompt: PromptTemplate fields. ``bucket_by_length``: length-bucketed training batches.
        tokenizer, kind: set by ``train.py`` from the backbone (``attach``); ``likelihood``:
            batches for the decoder likelihood mode.
        protocol: ``ranking`` (pairs or likelihood batches) | ``paper`` (WeaveRec's released prompt,
            decoders; ``paper``: its ``PaperTemplate`` settings).
        collection: the name of this set of domains (synthetic, amazon, raw2014-k5...): the default
            adapter store is one folder a collection, so same-named domains never share adapters.
        root, year, k_core: data-config settings that the domain specs interpolate
            (``conf/data/raw.yaml``); the domains' own specs are what is read.
        candidates: ``sampled`` (the fixed negatives) | ``retrieved`` (two-stage: each user's candidates are
            the top ``retrieve_k`` of the ``retriever`` run folder, ``recsys.data.retrieval``; None: the K it stored).
        train_negatives: ``sampled`` (fresh ``candidate_sampling`` draws) | ``retrieved`` (hard negatives from
            the ``retriever``'s top K of each target user, ``recsys.data.retrieval.RetrievedNegatives``).
    """

    def __init__(
        self, domains: dict[str, dict], target: str, sources: list[str] | None = None, target_fraction: float = 1.0,
        mix: str = "target", hybrid_cap: int = 40_000, max_history: int = 10,
        num_negatives: int = 19, num_train_negatives: int = 4, candidate_sampling: str = "uniform",
        max_eval_users: int | None = None, max_train_examples: int | None = None, cap_scales_with_fraction: bool = False,
        train_on_val: bool = False, selection_share: float = 0.02, seed: int = 0,
        batch_size: int = 16, eval_batch_size: int = 8, num_workers: int = 0, bucket_by_length: bool = False,
        prompt: dict | None = None, cache_dir: str | None = None,
        tokenizer: Any = None, kind: str = "encoder", likelihood: bool = False,
        root: str | None = None, year: int | None = None, k_core: int | None = None,
        protocol: str = "ranking", paper: dict | None = None, collection: str | None = None,
        candidates: str = "sampled", retriever: str | None = None, retrieve_k: int | None = None,
        train_negatives: str = "sampled",
    ):
        super().__init__()
        # the config's domains, and the plain-format ones found under root (the config's own specs win)
        self.domain_specs = {**plain_domains(root), **{k: dict(v or {}) for k, v in dict(domains or {}).items()}}
        self.target, self.sources = target, list(sources or [])
        self.target_fraction, self.mix, self.hybrid_cap = float(target_fraction), mix, int(hybrid_cap)
        self.max_history, self.num_negatives = int(max_history), int(num_negatives)
        self.num_train_negatives, self.candidate_sampling = int(num_train_negatives), candidate_sampling
        self.max_eval_users, self.max_train_examples = max_eval_users, max_train_examples
        self.cap_scales_with_fraction = bool(cap_scales_with_fraction)
        self.train_on_val, self.selection_share = bool(train_on_val), float(selection_share)
        self.seed, self.batch_size, self.eval_batch_size = int(seed), int(batch_size), int(eval_batch_size)
        self.num_workers, self.bucket_by_length = int(num_workers), bool(bucket_by_length)
        self.template = checked(PromptTemplate, prompt, "data.prompt", DataError)  # typed: a typo'd key or type fails here
        self.protocol, self.paper_template = protocol, checked(PaperTemplate, paper, "data.paper", DataError)
        self.collection = collection  # the name of this set of domains (it names the adapter store)
        # evaluation candidates: sampled (fixed negatives) | retrieved (a retriever run's top K, recsys.data.retrieval)
        self.candidates, self.retriever, self.train_negatives = candidates, retriever, train_negatives
        self.retrieve_k = None if retrieve_k is None else int(retrieve_k)  # None: the K the retriever stored
        self.cache_dir, self.root = cache_dir, root
        self.kind, self.likelihood = kind, likelihood
        self.tokenizer = tokenizer
        self.item_ids = False  # attach_ids: batches of item ids, no text
        self.domains: dict[str, Domain] = {}
        self.skip_streams: set[str] = set()  # training streams the module does not train (``train_only``)
        self.train_examples, self.epoch_batches = train_options()  # set by ``train_only``
        check_settings(self)

    def attach(self, tokenizer, kind: str, likelihood: bool = False) -> "RecDataModule":
        """Give the DataModule the backbone's tokenizer (the text layout depends on it); ``attach(None,
        "ids")``: batches of item indices for a method without a backbone (``recsys.data.ids``)."""
        self.tokenizer, self.kind, self.likelihood = tokenizer, kind, likelihood
        return self

    def attach_ids(self) -> "RecDataModule":
        """Batches of item ids instead of text (``recsys.data.ids.IdCollator``), for a method without a
        language model (``needs_backbone = False``)."""
        self.item_ids = True
        return self

    def stream_names(self) -> list[str]:
        """The training streams of this mix: ``train``, or for ``hybrid`` ``target`` and ``hybrid/<S>`` a source."""
        if self.mix != "hybrid":
            return ["train"]
        return ["target"] + [f"hybrid/{s}" for s in self.sources]

    def train_only(self, streams: set[str] | None, examples: str = "prefixes", batches: str = "all") -> None:
        """Train only these streams (None: all; e.g. not a reused WeaveRec hybrid's), on ``examples`` and
        ``batches`` an epoch (:func:`train_options`); the pipeline passes the module's ``train_streams()``,
        ``train_examples()`` and ``epoch_batches()`` before ``setup``."""
        self.skip_streams = set() if streams is None else set(self.stream_names()) - set(streams)
        self.train_examples, self.epoch_batches = train_options(examples, batches)

    @property
    def used_domains(self) -> list[str]:
        return [self.target] + [s for s in self.sources]

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Once per node: build (and cache) the raw-dump domains, so ``setup`` only reads caches."""
        for name in self.used_domains:
            if self.domain_specs[name].get("source") == "raw":
                load_domain(name, self.domain_specs[name], self.cache_dir)

    def load_domains(self) -> None:
        """Read the used domains (once); ``train.py`` calls it before loading the backbone, so bad data fails fast."""
        for name in self.used_domains:
            if name not in self.domains:
                self.domains[name] = load_domain(name, self.domain_specs[name], self.cache_dir)
                log.info("domain %s: %s", name, self.domains[name].summary())

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_entries", None) is not None:
            return
        self.load_domains()
        self.samplers = {n: NegativeSampler(d, self.candidate_sampling) for n, d in self.domains.items()}
        if self.train_negatives == "retrieved":  # hard negatives for the target's examples
            self.samplers[self.target] = RetrievedNegatives(self.domains[self.target], self.retriever, self.candidate_sampling)
        tgt = self.domains[self.target]
        self.eval_users = selection.eval_users(self, tgt)
        self.selection_users = selection.selection_users(self, tgt) if self.train_on_val else None
        self.eval_sets: dict[str, EvalDataset] = {}
        for split in ("val", "test"):
            users = self.selection_users if split == "val" and self.train_on_val else self.eval_users
            exs = [e for e in tgt.examples(split, self.max_history) if e.user in users]
            if self.candidates == "retrieved":  # two-stage: the retriever's top K (target absent: position -1)
                cands, pos = retrieved_candidates(tgt, exs, split, self.retriever, self.retrieve_k)
            else:
                cands, pos = eval_candidates(tgt, exs, split, self.num_negatives, self.seed, self.candidate_sampling)
            self.eval_sets[split] = EvalDataset(self.target, exs, cands, pos)
        self.train_entries = selection.train_streams(self)
        if self.tokenizer is not None:
            self._text()

    def _text(self) -> TextEncoder:
        if self.tokenizer is None:
            raise RuntimeError("RecDataModule.attach(tokenizer, kind) must be called before loaders are built")
        if getattr(self, "text", None) is None:
            self.text = TextEncoder(self.tokenizer, self.kind, self.template)
        for name, d in self.domains.items():  # domains loaded since (the text can be built before setup)
            self.text.add_titles(name, d.titles)
        return self.text

    # ------------------------------------------------------------------ example selection (recsys/data/selection.py)
    def _domain_train(self, name: str) -> list[tuple[str, Example]]:
        return selection.domain_train(self, name)

    def hybrid_entries(self, source: str) -> list[tuple[str, Example]]:
        return selection.hybrid_entries(self, source)

    # ------------------------------------------------------------------ loaders
    def paper_prompt(self) -> PaperPrompt:
        """The paper protocol's prompt builder (``data.protocol=paper``, decoders)."""
        if getattr(self, "_paper", None) is None:
            self._paper = PaperPrompt(self._text(), self.tokenizer, self.paper_template)
        return self._paper

    def _collator(self):
        if self.item_ids:  # a method without a language model (needs_backbone = False): item ids, no text
            return IdCollator(self.max_history)
        if self.protocol == "paper":
            return PaperCollator(self.paper_prompt())
        return Collator(self._text(), self.likelihood)

    def _loader(self, ds: Dataset, batch_size: int, train: bool, lengths=None, seed_key: str = "",
                max_batches: int | None = None) -> DataLoader:
        sampler = EpochBatchSampler(len(ds), batch_size, shuffle=train, seed=stable_seed(self.seed, seed_key), pad=train,
                                    lengths=lengths, max_batches=max_batches)
        # the loader's own generator: starting an iterator draws its worker seed from it, not from the
        # global RNG, so dropout does not depend on when loaders start (e.g. after a resume)
        generator = torch.Generator().manual_seed(stable_seed("loader", self.seed, seed_key))
        return (ResumableLoader if train else DataLoader)(
            ds, batch_sampler=sampler, collate_fn=self._collator(),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, generator=generator,
        )

    def _lengths(self, entries) -> list[int] | None:
        if not self.bucket_by_length:
            return None
        if self.item_ids:  # every history item is one position
            return [len(ex.history) for _, ex in entries]
        titles = {n: self._text().title_ids(n) for n in self.domains}
        return [sum(len(titles[d][i]) for i in ex.history) for d, ex in entries]

    def rank_batch_size(self) -> int:
        """This process's share of ``batch_size``, which is the global training batch: with W processes
        (``trainer.devices`` x ``trainer.num_nodes``) each takes ``batch_size / W`` of every step's
        examples, so a config trains the same optimisation on 1 process or 64."""
        world = self.trainer.world_size if self.trainer is not None else _dist()[1]
        if self.batch_size % world:
            raise DataError(
                f"data.batch_size={self.batch_size} is the global training batch and must divide evenly over "
                f"the {world} processes (trainer.devices x trainer.num_nodes): use a multiple of {world}"
            )
        return self.batch_size // world

    def train_loaders(self) -> dict[str, DataLoader]:
        """One loader per training stream (a module training several adapters gets one stream each)."""
        out = {}
        for name, entries in self.train_entries.items():
            ds = TrainDataset(entries, self.samplers, self.num_train_negatives, stable_seed(self.seed, name))
            out[name] = self._loader(ds, self.rank_batch_size(), True, self._lengths(entries), name,
                                     target_batches(self, entries))
        return out

    def train_dataloader(self):
        """One loader, or for several streams (WeaveRec's branches) a ``CombinedLoader`` in
        ``max_size`` mode: an epoch is one pass over the longest stream, and a stream that is
        exhausted yields None (its branch skips the step) instead of restarting, so each branch sees
        each of its examples once an epoch, as the release trains each adapter on its own data."""
        loaders = self.train_loaders()
        if list(loaders) == ["train"]:
            return loaders["train"]
        from lightning.pytorch.utilities import CombinedLoader

        return CombinedLoader(loaders, mode="max_size")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["val"], self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["test"], self.eval_batch_size, False)

    def eval_dataloader(self, split: str) -> DataLoader:
        return self.val_dataloader() if split == "val" else self.test_dataloader()

    # ------------------------------------------------------------------ reports
    def reference_metrics(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Random and popularity rankers on the target's fixed candidates of ``split``."""
        ds = self.eval_sets[split]
        counts = np.asarray(self.domains[self.target].train_item_counts())
        out = reference_metrics(ds.candidates, ds.target, counts, seed=self.seed)
        if self.candidates == "retrieved":  # metrics.json: retrieval/<split>/recall@K
            out["retrieval"] = {f"recall@{ds.candidates.shape[1]}": retrieval_recall(ds.target)}
        return out

    def summary(self) -> dict:
        out = {"target": self.domains[self.target].summary()}
        for name, entries in self.train_entries.items():
            out[f"train_examples/{name}"] = len(entries)
        out["val_examples"] = len(self.eval_sets["val"])
        out["test_examples"] = len(self.eval_sets["test"])
        return out
