"""What every method shares: the training and evaluation steps, metrics, optimizer and schedule,
and checkpoints that hold only what trains.

A method subclasses :class:`RecModule` and implements ``score(batch) -> (B, C)``; the loss is the
softmax cross-entropy of the target against its negatives (X-Cross's loss, used by every method).

The method contract (what the pipeline, ``recsys/pipeline/run.py`` and ``recsys/pipeline/stages.py``, asks of a method
class; CONTRIBUTING.md walks through it):

- ``name`` and ``kind`` (class attributes): the method's name (``method.name`` of
  ``conf/method/<name>.yaml``) and what it trains (``KINDS``); the pipeline asks these, never a list
  of names.
- ``needs_backbone`` (class attribute, default True): False for a method without a language model
  (e.g. an ID-based baseline): the pipeline loads no backbone, attaches no tokenizer (batches then hold
  item ids, ``recsys.data.ids.IdCollator``) and passes ``backbone=None``.
- ``required_adapters(run, backbone, **kwargs) -> list[AdapterSpec]``: the stored adapters it needs;
  the pipeline finds them, trains the missing ones it may, and hands their folders in ``run.adapters``.
- ``from_config(backbone, run, **kwargs)``: builds the module from its own config keys
  (``method.module`` less ``_target_``) and :class:`RunInfo`, the narrow typed view of the run.
- ``train_streams()``: the DataModule's training streams it trains (None: all of them).
- ``input_adapters()``: the stored adapter folders it was built from (the run's inputs, for the loggers).

Evaluations write their per-user ranks through the pipeline's callback
(``recsys.evaluation.ranks.RankWriter``), never through a folder set on the module.
- ``train_examples()``: ``prefixes`` (default: every leave-one-out prefix an example) or ``sequences``
  (one window of ``data.max_history`` items a user and one each ``max_history`` items back, for a method
  that trains at every position of a causal sequence, as SASRec's ``train_on=sequence``).
- ``loads_sharded`` (class attribute, default False): True for a method whose only language model is
  ``backbone.model`` with its LoRA, scored by ``score``, and whose ``configure_model`` is
  ``recsys.models.sharded_load.shard_module``: ``trainer=fsdp2`` builds the backbone hollow, and that hook shards
  it and reads each rank's rows (the pipeline refuses ``trainer=fsdp2`` for the other methods).
- ``epoch_batches()``: ``all`` (default) or ``target``: a pooled stream's epoch capped at the batches of
  target-only training (joint training at equal steps, ``method.module.steps=equal``).
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recsys.evaluation import ranks
from recsys.core.errors import UserError, require, setting
from recsys.core.metrics import ChanceCheck, RankingMetrics, eval_ranks
from recsys.models.adapter_store import AdapterSpec, AdapterStore
from recsys.models.backbone import Backbone
from recsys.models.generation import PaperProtocol

log = logging.getLogger("recsys")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warm-up: ``warmup_ratio`` of the steps, at least one."""
    return max(1, int(round(warmup_ratio * total_steps)))


def warmup_cosine(total_steps: int, warmup_ratio: float, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up for ``warmup_ratio`` of the steps, then cosine to ``min_ratio``."""
    warm = warmup_steps(total_steps, warmup_ratio)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        prog = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def stream_schedule(f: Callable[[int], float], steps: int, epoch_steps: int) -> Callable[[int], float]:
    """The schedule ``f`` of a stream that trains ``steps`` of each epoch's ``epoch_steps`` optimizer steps
    (its first ``steps``; a WeaveRec branch whose stream is shorter than the longest): global step -> ``f`` at
    the stream's own step, so ``f`` (built for the stream's own total) warms up and decays over the steps the
    stream takes. Past its ``steps`` in an epoch the stream takes no step; the value is then its last one's."""
    steps, epoch_steps = max(1, steps), max(1, epoch_steps)

    def g(step: int) -> float:
        epoch, r = divmod(step, epoch_steps)
        return f(epoch * steps + min(r, steps - 1))

    return g


@dataclass(frozen=True)
class RunInfo:
    """What a method may know of the run it is built for; the pipeline fills it (``recsys.pipeline.run.run_info``).

    Attributes:
        target, sources: the target domain and the source domains (``data.target``, ``data.sources``).
        mix: the DataModule's training mix (``target`` | ``joint`` | ``hybrid``).
        seed: the run's seed.
        data: the resolved data settings (recorded in manifests, compared by ``AdapterSpec.expect``).
        store: the adapter store of this run (its seed's adapters); None: no store.
        adapters: the required adapters the pipeline found or trained: spec name -> folder.
        absent: the optional ones it did not find, and why (spec name -> reason).
        num_items: the target domain's number of items (for an ID-based method's embedding table).
        monitor: model selection's metric (``optimized_metric``).
        paper: the paper protocol's prompt builder (``data.protocol=paper``), else None.
    """

    target: str
    sources: tuple[str, ...] = ()
    mix: str = "target"
    seed: int = 0
    data: Mapping[str, Any] = field(default_factory=dict)
    store: AdapterStore | None = None
    adapters: Mapping[str, Path] = field(default_factory=dict)
    absent: Mapping[str, str] = field(default_factory=dict)
    num_items: int = 0
    monitor: str = "val/ndcg@10"
    paper: Any = None


SCHEDULERS = ("cosine", "constant")  # the learning rate after warm-up
SCORINGS = ("head", "likelihood")  # how a candidate is scored (recsys.models.scoring)


@dataclass(frozen=True)
class Recipe:
    """The training recipe every method shares, typed: ``recsys.pipeline.run.train`` checks ``cfg.recipe``
    against it first, so a typo'd key, a missing key or a wrong type fails before anything loads.

    The values live in one place, ``conf/recipe/default.yaml`` (:meth:`default` reads it: a module built
    without the pipeline takes them from there); this class holds only their names, types and allowed ranges."""

    optimizer: Mapping[str, Any]  # a partial optimizer (_target_, lr, ...)
    scheduler: str = setting(choices=SCHEDULERS)  # cosine | constant (after warm-up)
    warmup_ratio: float = setting(at_least=0, below=1)  # share of the steps with linear warm-up
    max_epochs: int = setting(at_least=0)  # epochs (trainer.max_epochs; 0: evaluate only)
    batch_size: int = setting(at_least=1)  # training users a batch (data.batch_size)
    gradient_clip_val: float | None = setting(at_least=0)  # gradient-norm clipping (trainer.gradient_clip_val)
    patience: int = setting(at_least=0)  # validations without a better monitored metric before early stopping

    def __post_init__(self):
        for key in ("lr", "weight_decay"):
            if key in self.optimizer:
                require(f"recipe.optimizer.{key}", self.optimizer[key], **({"above": 0} if key == "lr" else {"at_least": 0}))

    @staticmethod
    @functools.cache
    def default() -> "Recipe":
        """``conf/recipe/default.yaml``, checked: the recipe of a module built without a config."""
        from omegaconf import OmegaConf

        from recsys import CONFIG_DIR
        from recsys.core.errors import checked

        path = CONFIG_DIR / "recipe" / "default.yaml"
        return checked(Recipe, OmegaConf.to_container(OmegaConf.load(path), resolve=True), str(path))

    def optimizer_factory(self) -> Callable:
        """The recipe's optimizer as a factory of the trainable parameters (its ``_partial_`` config)."""
        import hydra

        return hydra.utils.instantiate(dict(self.optimizer), _convert_="all")


def health_metrics(chance: ChanceCheck) -> dict[str, float]:
    """metrics.json entries of a chance check (``<stream>/loss_after_warmup``, ``chance_loss``, ``collapsed``;
    the stream of a one-stream method is ``train``), warning on a collapse."""
    out = {}
    for stream, values in chance.report().items():
        out.update({f"{stream}/{k}": v for k, v in values.items()})
        if values["collapsed"]:
            log.warning(
                "%s: the training loss stayed at chance after warm-up (mean %.4f, ln C = %.4f): the model "
                "did not learn (scores of the candidates nearly equal, see %s/score_std); lower the learning "
                "rate or raise recipe.warmup_ratio", stream, values["loss_after_warmup"], values["chance_loss"],
                stream)
    return out


KINDS = ("lora", "integrators", "merge", "ids")  # what a method trains (RecModule.kind)


def method_classes() -> dict[str, type["RecModule"]]:
    """Every method of ``recsys/methods/`` by its ``name`` (each module imported once)."""
    import recsys.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    found, todo = {}, [RecModule]
    while todo:
        cls = todo.pop(0)
        todo.extend(cls.__subclasses__())
        if cls.__dict__.get("name"):
            found[cls.name] = cls
    return dict(sorted(found.items()))


def paper_protocol_error(cls) -> str:
    able = [n for n, c in method_classes().items() if c.one_language_model and c.needs_backbone]
    return (f"protocol=paper needs a method that runs one language model ({', '.join(able)}); "
            f"{cls.name or cls.__name__} does not: use protocol=ranking")


class RecModule(L.LightningModule):
    """Base LightningModule of every method.

    Args:
        backbone: the frozen backbone (model, tokenizer, kind).
        optimizer: a partial optimizer factory taking the trainable parameters
            (``_partial_: true`` in the config); None: the default recipe's (``Recipe.default``).
        scheduler: ``cosine`` (decay after warm-up) | ``constant``; None: the default recipe's.
        warmup_ratio: share of the steps with linear warm-up; None: the default recipe's.
        scoring: ``head`` (default, pooled token -> head) or ``likelihood`` (decoders only).
    """

    name: ClassVar[str] = ""  # the method's name: ``method.name`` of conf/method/<name>.yaml
    kind: ClassVar[str] = ""  # what it trains (KINDS): lora (one LoRA adapter and head: evaluate.py adapter= rebuilds
    #   a stored one) | integrators (on frozen stored adapters) | merge (adapters merged into one) | ids (no language model)
    one_language_model: ClassVar[bool] = True  # the paper protocol generates with ``self.model`` (X-Cross: False)
    needs_backbone: ClassVar[bool] = True  # False: no language model; the pipeline passes backbone=None

    def __init__(self, backbone: Backbone | None, optimizer: Callable | None = None, scheduler: str | None = None,
                 warmup_ratio: float | None = None, scoring: str = "head"):
        super().__init__()
        recipe = Recipe.default() if None in (optimizer, scheduler, warmup_ratio) else None
        scheduler = recipe.scheduler if scheduler is None else scheduler
        warmup_ratio = recipe.warmup_ratio if warmup_ratio is None else warmup_ratio
        require("method.module.scoring", scoring, choices=SCORINGS)
        if scoring == "likelihood" and (backbone is None or backbone.kind != "decoder"):
            raise UserError(
                f"method.scoring=likelihood needs a decoder backbone; {getattr(backbone, 'name', 'none')} is not one: "
                "use scoring=head"
            )
        require("method.module.scheduler", scheduler, choices=SCHEDULERS)
        self.backbone = backbone
        self.kind = backbone.kind if backbone is not None else None
        self.scoring = scoring
        self.optimizer_factory = optimizer or recipe.optimizer_factory()
        self.scheduler, self.warmup_ratio = scheduler, warmup_ratio
        self.metrics = nn.ModuleDict({"val": RankingMetrics(), "test": RankingMetrics()})
        self.strict_loading = False  # checkpoints hold only the trainable weights
        self.val_history: dict[int, dict[str, float]] = {}  # epoch -> validation metrics
        self.monitor = "val/ndcg@10"  # model selection's metric (``build`` sets the run's RunInfo.monitor)
        self.skip_training = False  # a method with nothing to train (e.g. a merge of stored adapters)
        self.paper: PaperProtocol | None = None  # the paper protocol, when enabled (enable_paper_protocol)
        self.chance = ChanceCheck()  # training losses after warm-up: a run that stays at ln C is flagged
        self.warmup_steps = 0  # set by configure_optimizers
        self.rank_log = ranks.RankLog()  # per-user ranks of the last evaluation (the pipeline's RankWriter writes them)
        self.stored_inputs: list[Path] = []  # the stored adapters the pipeline found for it (``build``: run.adapters)

    def enable_paper_protocol(self, prompt) -> None:
        """WeaveRec's released protocol (``protocol=paper``, :class:`PaperProtocol`): train on the answer tokens,
        and test by greedy generation + exact title match (``<split>/gen/...``) beside the likelihood ranking
        of the same candidates (the usual keys). Needs a decoder with ``scoring=likelihood`` and a method
        that runs one causal LM (``self.model``)."""
        if not self.one_language_model or not isinstance(getattr(self, "model", None), nn.Module):
            raise ValueError(paper_protocol_error(type(self)))
        if self.scoring != "likelihood":
            raise ValueError("protocol=paper ranks by likelihood and generates: set method.module.scoring=likelihood "
                             "(and a decoder backbone)")
        self.paper = PaperProtocol(prompt)

    # ------------------------------------------------------------------ the method contract
    @classmethod
    def check(cls, run: RunInfo, scoring: str = "head", scheduler: str = "cosine", warmup_ratio: float = 0.1,
              **kwargs) -> None:
        """The method's own keys (``method.module``) and the run checked before anything loads (no backbone,
        no data read; ``run.num_items`` is 0): a UserError naming ``method.module.<key>`` and what is allowed.
        A method with keys of its own overrides this and calls ``super().check``."""
        require("method.module.scoring", scoring, choices=SCORINGS)
        require("method.module.scheduler", scheduler, choices=SCHEDULERS)
        require("method.module.warmup_ratio", warmup_ratio, at_least=0, below=1)

    @classmethod
    def required_adapters(cls, run: RunInfo, backbone: Backbone | None, **kwargs) -> list[AdapterSpec]:
        """The stored adapters this method needs for ``run`` (``kwargs``: its config keys); none by default."""
        return []

    @classmethod
    def from_config(cls, backbone: Backbone | None, run: RunInfo, **kwargs) -> "RecModule":
        """Build from the method's own config keys and the run; methods that need the run override this."""
        return cls(backbone, **kwargs)

    @classmethod
    def build(cls, backbone: Backbone | None, run: RunInfo, **kwargs) -> "RecModule":
        """``check``, ``from_config``, then the run's model-selection metric, stored adapters and protocol (what
        the pipeline calls)."""
        cls.check(run, **kwargs)
        module = cls.from_config(backbone, run, **kwargs)
        module.monitor = run.monitor
        module.stored_inputs = [Path(f) for f in run.adapters.values()]
        if run.paper is not None:
            module.enable_paper_protocol(run.paper)
        return module

    def train_streams(self) -> set[str] | None:
        """The DataModule training streams this module trains (None: every stream)."""
        return None

    def input_adapters(self) -> list[Path]:
        """The stored adapter folders this module was built from, in order (the run's inputs, which the
        pipeline hands to the loggers: ``recsys.pipeline.tracking.use_adapters``); by default those the
        pipeline found for its ``required_adapters`` (``RunInfo.adapters``)."""
        return list(self.stored_inputs)

    def train_examples(self) -> str:
        """``prefixes`` (every prefix an example) or ``sequences`` (a user's prefixes a window apart,
        ``recsys.data.selection.sequence_windows``); the pipeline passes it to ``RecDataModule.train_only``."""
        return "prefixes"

    def epoch_batches(self) -> str:
        """``all`` (every batch of the training stream an epoch) or ``target`` (as many as target-only training
        takes on the run's target examples: a pooled stream at equal steps); passed to ``RecDataModule.train_only``."""
        return "all"

    # ------------------------------------------------------------------ hooks for train.py
    def extra_params(self) -> dict[str, float]:
        """Extra ``params/...`` entries of metrics.json."""
        return {}

    def extra_metrics(self) -> dict[str, float]:
        """Extra metrics.json entries, added after testing."""
        return {}

    def training_health(self) -> dict[str, float]:
        """metrics.json entries of the chance check (:func:`health_metrics`)."""
        return health_metrics(self.chance)

    def export(self, store, manifest: dict):
        """Write what was trained to the adapter store; returns the folder (None: nothing to export)."""
        return None

    def best_epoch(self, monitor: str | None = None) -> int | None:
        """The epoch with the best validation ``monitor`` (default ``self.monitor``; the first, on ties)."""
        if not self.val_history:
            return None
        monitor = monitor or self.monitor
        return max(sorted(self.val_history), key=lambda e: self.val_history[e].get(monitor, -math.inf))

    def best_val_metrics(self, monitor: str) -> dict[str, float]:
        """Validation metrics of the epoch with the best ``monitor`` (the first, on ties)."""
        best = self.best_epoch(monitor)
        return {} if best is None else dict(self.val_history[best])

    # ------------------------------------------------------------------ to implement
    def score(self, batch: dict) -> torch.Tensor:
        """(B, C) candidate scores."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores.float(), labels)

    def objective(self, batch: dict, score_fn: Callable[[dict], torch.Tensor], stream: str = "train") -> torch.Tensor:
        """The training loss of one batch: softmax CE over the candidates' scores, or under the paper
        protocol the language-model loss of the answer (``score_fn`` unused). Logs ``<stream>/score_std``,
        the spread of a user's candidate scores (near 0: the model cannot tell them apart), and feeds
        the chance check after warm-up."""
        if self.paper is not None:
            return self.paper.loss(self.model, batch)
        scores = score_fn(batch)
        loss = self.loss(scores, batch["labels"])
        spread = scores.detach().float().std(dim=1).mean()
        self.log(f"{stream}/score_std", spread, batch_size=batch["labels"].numel())
        if self.global_step >= self.warmup_steps:
            self.chance.update(stream, loss.detach(), scores.size(1))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.objective(batch, self.score)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].numel())
        return loss

    def _eval_step(self, stage: str, batch: dict) -> None:
        scores = self.score(batch).float()
        self.metrics[stage].update(scores, batch["labels"])
        self.rank_log.add(stage, eval_ranks(scores, batch["labels"]), scores.size(1))  # per-user ranks (recsys.evaluation.ranks)
        if self.paper is not None:  # generate with the model as ``score`` left it
            self.paper.evaluate(stage, self.model, self.backbone.tokenizer, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_metrics(self, stage: str) -> None:
        values = {f"{stage}/{k}": v for k, v in self.metrics[stage].compute().items()}
        if self.paper is not None:
            values.update(self.paper.compute(stage))
        self.log_synchronised(values, prog_bar=stage == "val")
        self.metrics[stage].reset()
        if stage == "val" and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.val_history[self.current_epoch] = {k: float(v) for k, v in values.items()}
        self.rank_log.close(stage)  # this evaluation's ranks, for the pipeline's ranks.RankWriter

    def log_synchronised(self, values: dict, **kwargs) -> None:
        """Log epoch values that are already the same on every rank (torchmetrics' ``compute`` gathers the
        states of all ranks). ``sync_dist=True`` with ``max``: an all-reduce of identical values, exact for any
        number of ranks (a mean over 3 ranks may not be); with ``sync_dist=False`` Lightning warned, once a key,
        that epoch metrics should be synchronised."""
        self.log_dict(values, sync_dist=True, reduce_fx="max", **kwargs)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def param_groups(self) -> list:
        """What the optimizer gets: the trainable parameters, or groups with their own settings."""
        return self.trainable_parameters()

    def lr_lambdas(self, total: int) -> Callable[[int], float] | list[Callable[[int], float]]:
        """The LR multiplier of ``total`` optimizer steps (warm-up, then cosine or constant), or one a param
        group (``param_groups``'s order) for a method whose groups train over different numbers of steps."""
        return warmup_cosine(total, self.warmup_ratio, 1.0 if self.scheduler == "constant" else 0.0)

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.param_groups())
        if self.scheduler == "constant" and self.warmup_ratio <= 0:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.warmup_steps = warmup_steps(total, self.warmup_ratio) if self.warmup_ratio > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambdas(total))
        # name "lr": LearningRateMonitor logs lr/<group name> (lr/integrators, lr/w ...), or lr for one group
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------ checkpoints: only what trains
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["val_history"] = self.val_history
        checkpoint["chance_check"] = self.chance.state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = keep - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(
                f"checkpoint lacks {len(missing)} trainable weights of this module (e.g. {sorted(missing)[:3]}): "
                "was it written by another method or LoRA configuration?"
            )
        self.val_history = dict(checkpoint.get("val_history", {}))
        self.chance.state = {k: list(v) for k, v in checkpoint.get("chance_check", {}).items()}
