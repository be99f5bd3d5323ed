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
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from recsys.data import selection, settings
from recsys.data.candidates import NegativeSampler, eval_candidates, stable_seed
from recsys.data.domain import DataError, Domain, Example
from recsys.data.paper_prompt import PaperCollator, PaperPrompt, PaperTemplate
from recsys.data.ids import IdCollator
from recsys.data.retrieval import recall as retrieval_recall
from recsys.data.retrieval import RetrievedNegatives, retrieved_candidates
from recsys.data.settings import BatchSettings, CandidateSettings, DomainSettings, plain_domains  # noqa: F401
from recsys.data.text import Collator, PromptTemplate, TextEncoder
from recsys.core.metrics import reference_metrics

log = logging.getLogger("recsys.data")

SOURCES = ("synthetic", "plain", "raw")  # a domain spec's ``source``
TRAIN_EXAMPLES = ("prefixes", "sequences")  # every prefix an example | a user's prefixes a window apart
EPOCH_BATCHES = ("all", "target")  # every batch of a stream an epoch | as many as target-only training takes


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
        """Skip the yielded batches when the saved epoch is passed again. All of them is a stream that had
        ended: in a ``CombinedLoader`` a shorter stream (a WeaveRec hybrid) ends mid-epoch and stays ended
        until the epoch does; saved at the epoch's end, Lightning goes on with the next epoch (``set_epoch``),
        which starts afresh."""
        self.batch_sampler.resume(int(state["epoch"]), int(state["batches"]))


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


class RecDataModule(L.LightningDataModule):
    """One DataModule over Amazon-like domains for every method (see the module docstring).

    Args (typed settings, ``recsys.data.settings``; ``from_config`` builds them from the ``data`` config):
        domains: which domains are read and which examples train and evaluate (``DomainSettings``).
        candidates: evaluation candidates and training negatives, and the protocol (``CandidateSettings``).
        batching: batch sizes, workers, length bucketing (``BatchSettings``).
        prompt: the text layout (``PromptTemplate``); ``paper``: the paper protocol's (``PaperTemplate``).

    The backbone's tokenizer arrives later (``attach``; ``attach_ids`` for a method without a backbone).
    """

    def __init__(self, domains: DomainSettings, candidates: CandidateSettings | None = None,
                 batching: BatchSettings | None = None, prompt: PromptTemplate | None = None,
                 paper: PaperTemplate | None = None):
        super().__init__()
        self.domain_settings = domains
        self.candidate_settings = candidates or CandidateSettings()
        self.batching = batching or BatchSettings()
        self.template, self.paper_template = prompt or PromptTemplate(), paper or PaperTemplate()
        self.tokenizer, self.kind, self.likelihood = None, "encoder", False  # attach: the backbone's
        self.item_ids = False  # attach_ids: batches of item ids, no text
        self.domains: dict[str, Domain] = {}
        self.skip_streams: set[str] = set()  # training streams the module does not train (``train_only``)
        self.train_examples, self.epoch_batches = train_options()  # set by ``train_only``
        self.selection_users: set[int] | None = None  # train_on_val: the held-out users (``setup``)

    @classmethod
    def from_config(cls, data: Mapping | None = None, **given) -> "RecDataModule":
        """From the ``data`` config as users write it (``conf/data/*.yaml``) and ``given`` keys (``seed``, ``mix``,
        or any data key, e.g. ``from_config(domains=..., target="tools")``):
        every setting checked first, a DataError naming ``data.<key>`` and what is allowed."""
        return cls(**settings.from_config(data, **given))

    # the settings the pipeline and the evaluation read (recsys.pipeline.run, recsys.evaluation)
    target = property(lambda self: self.domain_settings.target)
    sources = property(lambda self: list(self.domain_settings.sources))
    mix = property(lambda self: self.domain_settings.mix)
    seed = property(lambda self: self.domain_settings.seed)
    max_history = property(lambda self: self.domain_settings.max_history)
    domain_specs = property(lambda self: self.domain_settings.specs)
    protocol = property(lambda self: self.candidate_settings.protocol)

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
        return self.domain_settings.used

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Once per node: build (and cache) the raw-dump domains, so ``setup`` only reads caches."""
        for name in self.used_domains:
            if self.domain_specs[name].get("source") == "raw":
                load_domain(name, self.domain_specs[name], self.domain_settings.cache_dir)

    def load_domains(self) -> None:
        """Read the used domains (once); ``train.py`` calls it before loading the backbone, so bad data fails fast."""
        for name in self.used_domains:
            if name not in self.domains:
                self.domains[name] = load_domain(name, self.domain_specs[name], self.domain_settings.cache_dir)
                log.info("domain %s: %s", name, self.domains[name].summary())

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_entries", None) is not None:
            return
        self.load_domains()
        s, c = self.domain_settings, self.candidate_settings
        self.samplers = {n: NegativeSampler(d, c.candidate_sampling) for n, d in self.domains.items()}
        if c.train_negatives == "retrieved":  # hard negatives for the target's examples
            self.samplers[self.target] = RetrievedNegatives(self.domains[self.target], c.retriever, c.candidate_sampling)
        tgt = self.domains[self.target]
        self.eval_users = selection.eval_users(s, tgt)
        self.selection_users = selection.selection_users(s, tgt) if s.train_on_val else None
        self.eval_sets: dict[str, EvalDataset] = {}
        for split in ("val", "test"):
            users = self.selection_users if split == "val" and s.train_on_val else self.eval_users
            exs = [e for e in tgt.examples(split, self.max_history) if e.user in users]
            if c.candidates == "retrieved":  # two-stage: the retriever's top K (target absent: position -1)
                cands, pos = retrieved_candidates(tgt, exs, split, c.retriever, c.retrieve_k)
            else:
                cands, pos = eval_candidates(tgt, exs, split, c.num_negatives, self.seed, c.candidate_sampling)
            self.eval_sets[split] = EvalDataset(self.target, exs, cands, pos)
        self.train_entries = selection.train_streams(s, self.domains, self.selection_users, self.skip_streams,
                                                     self.train_examples)
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
    def domain_train(self, name: str) -> list[tuple[str, Example]]:
        """``name``'s training examples under these settings (``recsys.data.selection.domain_train``)."""
        return selection.domain_train(self.domain_settings, self.domains, name, self.selection_users)

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
            num_workers=self.batching.num_workers, persistent_workers=self.batching.num_workers > 0, generator=generator,
        )

    def _lengths(self, entries) -> list[int] | None:
        if not self.batching.bucket_by_length:
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
        if self.batching.batch_size % world:
            raise DataError(
                f"data.batch_size={self.batching.batch_size} is the global training batch and must divide evenly over "
                f"the {world} processes (trainer.devices x trainer.num_nodes): use a multiple of {world}"
            )
        return self.batching.batch_size // world

    def train_loaders(self) -> dict[str, DataLoader]:
        """One loader per training stream (a module training several adapters gets one stream each)."""
        out = {}
        for name, entries in self.train_entries.items():
            ds = TrainDataset(entries, self.samplers, self.candidate_settings.num_train_negatives,
                              stable_seed(self.seed, name))
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
        return self._loader(self.eval_sets["val"], self.batching.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_sets["test"], self.batching.eval_batch_size, False)

    def eval_dataloader(self, split: str) -> DataLoader:
        return self.val_dataloader() if split == "val" else self.test_dataloader()

    # ------------------------------------------------------------------ reports
    def reference_metrics(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Random and popularity rankers on the target's fixed candidates of ``split``."""
        ds = self.eval_sets[split]
        counts = np.asarray(self.domains[self.target].train_item_counts())
        out = reference_metrics(ds.candidates, ds.target, counts, seed=self.seed)
        if self.candidate_settings.candidates == "retrieved":  # metrics.json: retrieval/<split>/recall@K
            out["retrieval"] = {f"recall@{ds.candidates.shape[1]}": retrieval_recall(ds.target)}
        return out

    def summary(self) -> dict:
        out = {"target": self.domains[self.target].summary()}
        for name, entries in self.train_entries.items():
            out[f"train_examples/{name}"] = len(entries)
        out["val_examples"] = len(self.eval_sets["val"])
        out["test_examples"] = len(self.eval_sets["test"])
        return out
