"""X-Cross (Hadad et al., SIGIR 2025): layer-wise fusion of n frozen source-domain models.

The frozen backbone with n frozen source LoRA adapters runs as n streams; after every layer an
integrator refines each stream with the others; learnable w_m combine the last layer's streams;
the shared scoring head scores (history, candidate) pairs. Only the integrators, w and the head
train, on the target domain (docs/methods.md, "X-Cross"; the model is ``recsys.models.integrator``).

Source adapters come from the adapter store (``<store>/<backbone>/<source>/seed-<seed>/``, written by
``python train.py method=lora data.target=<source>``) or from any peft adapter folders
(``method.module.adapters``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from recsys.methods.base import RecModule, RunInfo
from recsys.models.adapter_store import AdapterSpec, AdapterStore, SourceAdapterError, load_into, mismatch
from recsys.models.backbone import Backbone
from recsys.models.integrator import XCrossModel
from recsys.models.scoring import as_pairs

log = logging.getLogger("recsys")
__all__ = ["XCrossModule", "SourceAdapterError", "fingerprint"]


def _adapter_config(folder: Path) -> dict:
    f = folder / "adapter_config.json"
    if not f.is_file():
        raise SourceAdapterError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    AdapterStore.verify(folder)  # every file there (a stored one: the head too) and readable, or StoreError naming it
    return json.loads(f.read_text())


def fingerprint(folder: Path) -> str:
    """sha256 of an adapter folder's weights and head: what X-Cross's checkpoints depend on."""
    h = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_model.bin", "head.safetensors"):
        f = folder / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# data settings that shape the model's input text: a source adapter trained with other values sees
# differently built prompts on the target than it was trained on
TEXT_SETTINGS = ("max_history", "prompt")


class XCrossModule(RecModule):
    """X-Cross as a LightningModule.

    Args:
        backbone: the frozen backbone (the one the source adapters were trained on).
        adapters: source name -> peft adapter folder (n >= 2), in stream order.
        beta, gamma: scales of the integrators' direct and interaction terms **[ours]: 1.0**.
        mode: ``token`` (z per token, default) | ``pooled`` (z from the pooled token) **[ours]**.
        init: W_concat init, ``zero`` (X-Cross starts as the n source models, default) | ``normal`` **[ours]**.
        w_init: initial w (n values); None: 1/n each **[ours]**.
        combine: decoders: ``after_norm`` (default) | ``before_norm`` **[ours]**.
        routing: ``slice`` (default) | ``peft``: how each stream gets its adapter (both exact; see
            ``XCrossModel``) **[ours]**.
        normalize: ``layernorm`` (default) | ``none``: what W_concat reads (see ``Integrator``) **[ours]**.
        compile_integrators: ``auto`` (default: on CUDA) | ``true`` | ``false``: ``torch.compile`` the
            integrators' fused step.
        integrator_lr: the integrators' learning rate (None: the recipe's) **[ours]**.
        head_init: ``mean`` (average of the source adapters' heads, default) | ``fresh`` | a source
            name (that source's head) **[ours]**.
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio); scoring is ``head``.
    """

    name = "xcross"
    kind = "integrators"
    one_language_model = False  # n streams, not one causal LM: no paper protocol (generation)

    def __init__(self, backbone: Backbone, adapters: dict[str, str], beta: float = 1.0, gamma: float = 1.0,
                 mode: str = "token", init: str = "zero", w_init: list[float] | None = None,
                 combine: str = "after_norm", head_init: str = "mean", head_dropout: float = 0.0,
                 routing: str = "slice", normalize: str = "layernorm", compile_integrators: bool | str = "auto",
                 integrator_lr: float | None = None, **kwargs):
        if kwargs.get("scoring", "head") != "head":
            raise ValueError("method.module.scoring: X-Cross scores with its head; use scoring=head")
        super().__init__(backbone, **kwargs)
        names = list(adapters)
        if len(names) < 2:
            raise SourceAdapterError(
                f"X-Cross needs at least two source adapters, got {names}: set e.g. 'data.sources=[toys,beauty]'"
            )
        folders = {n: Path(adapters[n]) for n in names}
        self.check_compatible(backbone, folders)
        peft_model = load_into(backbone.model, folders)
        heads = {n: AdapterStore.load_head(folders[n]) for n in names}
        head_state = self._initial_head(heads, head_init)
        self.source_names = names
        self.integrator_lr = integrator_lr
        self.source_folders = {n: str(folders[n]) for n in names}
        self.source_fingerprints = {n: fingerprint(folders[n]) for n in names}
        self.xcross = XCrossModel(peft_model, names, backbone.kind, beta=beta, gamma=gamma, mode=mode, init=init,
                                  w_init=w_init, head_state=head_state, head_dropout=head_dropout, combine=combine,
                                  routing=routing, normalize=normalize, compile_integrators=compile_integrators)
        self.effect_history: dict[int, float] = {}  # epoch -> xcross/integrator_effect on validation
        self.effect_last: float | None = None
        self.lora_reference = sum(
            p.numel() for k, p in peft_model.named_parameters() if f".{names[0]}." in k and "lora_" in k
        )

    def input_adapters(self) -> list[Path]:
        """The source adapters, in stream order (the store's, or ``adapters`` given by hand)."""
        return [Path(f) for f in self.source_folders.values()]

    @staticmethod
    def _initial_head(heads: dict, head_init: str) -> dict | None:
        if head_init == "fresh":
            return None
        if head_init == "mean":
            states = [h for h in heads.values() if h is not None]
            if not states:
                return None
            return {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
        if head_init in heads:
            return heads[head_init]
        raise ValueError(f"method.module.head_init={head_init!r}: use mean, fresh or one of {list(heads)}")

    @staticmethod
    def check_compatible(backbone: Backbone, folders: dict[str, Path]) -> None:
        """All adapters: complete, of this backbone, and of one rank and set of target modules."""
        seen = {}
        for name, folder in folders.items():
            cfg = _adapter_config(folder)
            manifest = folder / "manifest.json"
            why = mismatch(json.loads(manifest.read_text()), {"backbone": backbone.name}) if manifest.is_file() else None
            if why:
                raise SourceAdapterError(
                    f"source adapter {name!r} at {folder} was {why}: train it on this backbone (python train.py "
                    f"method=lora data.target={name} backbone=...) or pick the matching backbone"
                )
            seen[name] = (cfg.get("r"), tuple(sorted(cfg.get("target_modules") or [])))
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{n}: r={r} targets={list(t)}" for n, (r, t) in seen.items())
            raise SourceAdapterError(
                f"X-Cross needs source adapters of one rank and target modules; got {detail}. Retrain them "
                "with the same method.module.r and target_modules"
            )

    @classmethod
    def check(cls, run: RunInfo, adapters=None, **kwargs) -> None:
        """At least two source domains (``data.sources``) unless ``adapters`` names the folders; scoring=head."""
        super().check(run, **kwargs)
        if kwargs.get("scoring", "head") != "head":
            raise SourceAdapterError("method.module.scoring: X-Cross scores with its head; use scoring=head")
        if not adapters and len(run.sources) < 2:
            raise SourceAdapterError(
                f"X-Cross needs at least two source domains, got data.sources={list(run.sources)}: "
                "e.g. 'data.sources=[toys,beauty]'"
            )

    @classmethod
    def required_adapters(cls, run: RunInfo, backbone: Backbone, adapters=None, **kwargs) -> list[AdapterSpec]:
        """One stored LoRA adapter of this backbone a source (none when ``adapters`` names folders)."""
        if adapters:
            return []
        cls.check(run, **kwargs)
        return [AdapterSpec(s, expect={"backbone": backbone.name}) for s in run.sources]

    @classmethod
    def from_config(cls, backbone: Backbone, run: RunInfo, adapters=None, **kwargs) -> "XCrossModule":
        """Source adapters: ``adapters`` (name -> folder) if given, else the store's for ``data.sources``."""
        if adapters:
            folders = {n: Path(f) for n, f in dict(adapters).items()}
            for f in folders.values():  # folders given by hand: trained on this run's data too (the store's rule)
                why = run.store.data_problem(f, AdapterStore.load_manifest(f)) \
                    if run.store is not None and (f / "manifest.json").is_file() else None
                if why:
                    raise SourceAdapterError(why)
        else:
            folders = {s: Path(run.adapters[s]) for s in run.sources}
        warn_text_settings(run.data, folders)
        return cls(backbone, {n: str(f) for n, f in folders.items()}, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["xcross_sources"] = dict(self.source_fingerprints)
        checkpoint["xcross_effect"] = dict(self.effect_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The checkpoint holds only the integrators, w and the head: they are only meaningful on top of
        the very source adapters they were trained with."""
        super().on_load_checkpoint(checkpoint)
        self.effect_history = dict(checkpoint.get("xcross_effect", {}))
        saved = checkpoint.get("xcross_sources")
        if saved is None:
            return
        if list(saved) != self.source_names:
            raise SourceAdapterError(
                f"this X-Cross checkpoint was trained on the source adapters {list(saved)} (in this order), "
                f"not {self.source_names}: set data.sources (or method.module.adapters) as in its run"
            )
        changed = [n for n in self.source_names if saved[n] != self.source_fingerprints[n]]
        if changed:
            detail = ", ".join(f"{n} ({self.source_folders[n]})" for n in changed)
            raise SourceAdapterError(
                f"the source adapters {changed} differ from those this X-Cross checkpoint was trained with "
                f"(retrained or replaced since?): {detail}. Restore them, point paths.adapter_store (or "
                "method.module.adapters) at the originals, or train X-Cross again"
            )

    def param_groups(self) -> list:
        """The integrators at ``integrator_lr`` **[ours]**: W_concat multiplies whole hidden states (n*d
        inputs of magnitude ~1), so a head-sized learning rate swings z far in one Adam step and
        wrecks the streams; w and the head at the optimizer's lr."""
        integ = {"params": list(self.xcross.integrators.parameters()), "name": "integrators"}
        if self.integrator_lr is not None:
            integ["lr"] = self.integrator_lr
        # named groups: the LR curves read lr/integrators, lr/w, lr/head (LearningRateMonitor)
        return [integ, {"params": [self.xcross.w], "name": "w"},
                {"params": list(self.xcross.head.parameters()), "name": "head"}]

    def score(self, batch: dict) -> torch.Tensor:
        batch = as_pairs(batch)  # a decoder's prompt + continuations batch -> each candidate after its own prompt
        scores = self.xcross(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return scores.view(-1, batch["num_candidates"])

    def extra_params(self) -> dict[str, float]:
        integ = sum(p.numel() for p in self.xcross.integrators.parameters())
        return {"params/lora_reference": self.lora_reference, "params/integrators": integ,
                "params/integrators_over_lora": integ / max(1, self.lora_reference)}

    # ------------------------------------------------------------------ how much the integrators act
    def on_validation_epoch_start(self) -> None:
        self.xcross.measure_effect(True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        effect = self.xcross.measure_effect(False)
        if effect is None:
            return
        self.effect_last = effect
        self.log_dict({"xcross/integrator_effect": effect, "xcross/w_concat_abs": self.xcross.w_concat_abs()},
                      sync_dist=True)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.effect_history[self.current_epoch] = effect

    def extra_metrics(self) -> dict[str, float]:
        """w per source; ``xcross/integrator_effect`` on validation (the selected epoch's) and
        ``xcross/w_concat_abs`` of the tested weights, so a reader sees whether the integrators moved."""
        out = {f"xcross/w_{n}": float(w) for n, w in zip(self.source_names, self.xcross.w.detach().cpu())}
        out["xcross/w_concat_abs"] = self.xcross.w_concat_abs()
        effect = self.effect_history.get(self.best_epoch(), self.effect_last)
        if effect is not None:
            out["xcross/integrator_effect"] = effect
        return out


def warn_text_settings(data: Mapping, folders: dict[str, Path]) -> None:
    """Warn when a source adapter's manifest records other prompt settings than this run's ``data``."""
    for name, folder in folders.items():
        f = Path(folder) / "manifest.json"
        stored = json.loads(f.read_text()).get("data") if f.is_file() else None
        if not isinstance(stored, dict):
            continue
        diff = [k for k in TEXT_SETTINGS if k in stored and k in data and stored[k] != data.get(k)]
        if diff:
            log.warning("source adapter %s was trained with other %s (%s) than this run's (%s): its prompts "
                        "on the target are built differently", name, "/".join(f"data.{k}" for k in diff),
                        {k: stored[k] for k in diff}, {k: data.get(k) for k in diff})
