"""X-Cross (Hadad et al., SIGIR 2025): layer-wise fusion of n frozen source-domain models.

The frozen backbone with n frozen source LoRA adapters runs as n streams; after every layer an
integrator refines each stream with the others; learnable w_m combine the last layer's streams;
the shared scoring head scores (history, candidate) pairs. Only the integrators, w and the head
train, on the target domain (METHODS.md, "X-Cross"; the model is ``recsys.models.integrator``).

Source adapters come from the adapter store (``<store>/<backbone>/<source>/``, written by
``python train.py method=lora data.target=<source>``) or from any peft adapter folders
(``method.module.adapters``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel

from recsys.methods.base import RecModule
from recsys.models.adapter_store import AdapterStore
from recsys.models.backbone import Backbone
from recsys.models.integrator import XCrossModel

log = logging.getLogger("recsys")


class SourceAdapterError(ValueError):
    """Missing or incompatible source adapters."""


def _adapter_config(folder: Path) -> dict:
    import json

    f = folder / "adapter_config.json"
    if not f.is_file():
        raise SourceAdapterError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    return json.loads(f.read_text())


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
        head_init: ``mean`` (average of the source adapters' heads, default) | ``fresh`` | a source
            name (that source's head) **[ours]**.
        **kwargs: ``RecModule`` arguments (optimizer, scheduler, warmup_ratio); scoring is ``head``.
    """

    def __init__(self, backbone: Backbone, adapters: dict[str, str], beta: float = 1.0, gamma: float = 1.0,
                 mode: str = "token", init: str = "zero", w_init: list[float] | None = None,
                 combine: str = "after_norm", head_init: str = "mean", head_dropout: float = 0.0, **kwargs):
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
        peft_model = PeftModel.from_pretrained(backbone.model, str(folders[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            peft_model.load_adapter(str(folders[n]), adapter_name=n)
        heads = {n: AdapterStore.load_head(folders[n]) for n in names}
        head_state = self._initial_head(heads, head_init)
        self.source_names = names
        self.xcross = XCrossModel(peft_model, names, backbone.kind, beta=beta, gamma=gamma, mode=mode, init=init,
                                  w_init=w_init, head_state=head_state, head_dropout=head_dropout, combine=combine)
        self.lora_reference = sum(
            p.numel() for k, p in peft_model.named_parameters() if f".{names[0]}." in k and "lora_" in k
        )

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
            if manifest.is_file():
                import json

                m = json.loads(manifest.read_text())
                if m.get("backbone") not in (None, backbone.name):
                    raise SourceAdapterError(
                        f"source adapter {name!r} at {folder} was trained on backbone {m.get('backbone')!r}, "
                        f"not {backbone.name!r}: train it on this backbone (python train.py method=lora "
                        f"data.target={name} backbone=...) or pick the matching backbone"
                    )
            seen[name] = (cfg.get("r"), tuple(sorted(cfg.get("target_modules") or [])))
        if len(set(seen.values())) > 1:
            detail = ", ".join(f"{n}: r={r} targets={list(t)}" for n, (r, t) in seen.items())
            raise SourceAdapterError(
                f"X-Cross needs source adapters of one rank and target modules; got {detail}. Retrain them "
                "with the same method.module.r and target_modules"
            )

    @classmethod
    def from_config(cls, backbone: Backbone, datamodule=None, store=None, cfg=None, adapters=None,
                    train_missing: bool = False, **kwargs) -> "XCrossModule":
        """Source adapters: ``adapters`` (name -> folder) if given, else the store's, for ``data.sources``."""
        if adapters:
            folders = {n: Path(f) for n, f in dict(adapters).items()}
        else:
            sources = list(datamodule.sources) if datamodule is not None else []
            if len(sources) < 2:
                raise SourceAdapterError(
                    f"X-Cross needs at least two source domains, got data.sources={sources}: "
                    "e.g. 'data.sources=[toys,beauty]'"
                )
            folders = {s: store.path(backbone.name, s) for s in sources}
            missing = [s for s in sources if not store.exists(backbone.name, s)]
            if missing and train_missing:
                from recsys.run import train_source_adapters

                train_source_adapters(cfg, missing)
                missing = [s for s in sources if not store.exists(backbone.name, s)]
            if missing:
                cmds = "\n".join(f"  {train_command(cfg, s)}" for s in missing)
                raise SourceAdapterError(
                    f"missing source adapters for {missing} in {store.root}/ (backbone {backbone.name}). "
                    f"Produce each with:\n{cmds}\nor set method.module.train_missing=true to train them first."
                )
        return cls(backbone, {n: str(f) for n, f in folders.items()}, **kwargs)

    def score(self, batch: dict) -> torch.Tensor:
        scores = self.xcross(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return scores.view(-1, batch["num_candidates"])

    def extra_params(self) -> dict[str, float]:
        integ = sum(p.numel() for p in self.xcross.integrators.parameters())
        return {"params/lora_reference": self.lora_reference, "params/integrators": integ,
                "params/integrators_over_lora": integ / max(1, self.lora_reference)}

    def extra_metrics(self) -> dict[str, float]:
        return {f"xcross/w_{n}": float(w) for n, w in zip(self.source_names, self.xcross.w.detach().cpu())}


def train_command(cfg, source: str) -> str:
    """``python train.py method=lora ... data.target=<source>`` with this run's backbone, data and seed."""
    if cfg is None:
        return f"python train.py method=lora data.target={source}"
    from hydra.core.hydra_config import HydraConfig

    try:
        choices = HydraConfig.get().runtime.choices
        backbone, data = choices.get("backbone"), choices.get("data")
    except ValueError:
        backbone, data = None, None
    parts = ["python train.py method=lora"]
    if backbone:
        parts.append(f"backbone={backbone}")
    if data:
        parts.append(f"data={data}")
    if cfg.data.get("root"):
        parts.append(f"data.root={cfg.data.root}")
    parts += [f"data.target={source}", f"seed={cfg.seed}"]
    return " ".join(parts)
