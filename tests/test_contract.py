"""The method contract (CONTRIBUTING.md): a method is one class; the pipeline asks it what it needs.

- A method without a language model (``needs_backbone = False``) trains and tests through the real
  pipeline (``recsys.pipeline.run.train``) with no backbone loaded and batches of item ids: the seam an ID-based
  baseline (SASRec) lands on, touching only its own file, its config and its tests. The toy method below
  is such a file.
- ``from_config`` gets the run's narrow view (``RunInfo``) and its own config keys, nothing else.
- Typed settings fail fast: a typo'd or mistyped merge setting or prompt field fails in well under 3 s,
  before any backbone loads.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import recsys.pipeline.run as run
from recsys.core.errors import UserError, checked
from recsys.methods.base import RecModule, RunInfo
from conftest import compose_config, paths_under

CONF = Path(__file__).resolve().parents[1] / "conf"


class ItemBagModule(RecModule):
    """A toy ID-based method: a user is the sum of its history's item embeddings; a candidate's score is
    its dot product with it. ``needs_backbone = False``: no language model, no tokenizer."""

    needs_backbone = False

    def __init__(self, backbone, num_items: int, dim: int = 8, **kwargs):
        super().__init__(backbone, **kwargs)
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)  # id 0: padding

    @classmethod
    def from_config(cls, backbone, run: RunInfo, **kwargs) -> "ItemBagModule":
        assert backbone is None
        return cls(backbone, num_items=run.num_items, **kwargs)

    def score(self, batch: dict) -> torch.Tensor:
        user = (self.items(batch["history"]) * batch["history_mask"].unsqueeze(-1)).sum(1)  # (B, d)
        return torch.einsum("bd,bcd->bc", user, self.items(batch["candidates"] + 1))  # (B, C)


def config(tmp: Path, *overrides: str):
    cfg = compose_config("train", *paths_under(tmp), "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
                         "data.max_eval_users=16", "logger=none", *overrides)
    cfg.method = OmegaConf.create({
        "name": "item_bag", "mix": "target", "export": False,
        "module": {"_target_": f"{__name__}.ItemBagModule", "dim": 8, "scheduler": "${recipe.scheduler}",
                   "warmup_ratio": "${recipe.warmup_ratio}", "optimizer": "${recipe.optimizer}"}})
    return cfg


def test_a_method_without_a_backbone_trains_through_the_pipeline(tmp_path, monkeypatch):
    def no_backbone(*args, **kwargs):
        raise AssertionError("a method with needs_backbone=False loaded a backbone")

    monkeypatch.setattr(run, "load_backbone", no_backbone)
    _, metrics = run.train(config(tmp_path))
    assert metrics["params/trainable"] > 0 and 0.0 <= metrics["test/ndcg@10"] <= 1.0
    assert "zero_shot/test/ndcg@10" in metrics and "random/test/ndcg@10" in metrics
    assert (tmp_path / "metrics.json").is_file()


def test_from_config_gets_the_run_not_the_config():
    info = RunInfo(target="tools", sources=("toys",), num_items=30)
    module = ItemBagModule.build(None, info, dim=4)
    assert module.items.num_embeddings == 31 and module.monitor == info.monitor
    assert ItemBagModule.required_adapters(info, None) == []


def test_typed_settings_fail_fast():
    from recsys.data.text import PromptTemplate
    from recsys.models.merging import MergeSettings

    t0 = time.perf_counter()
    with pytest.raises(UserError, match="unknown merge settings"):
        MergeSettings.of({"rulez": "ties"})
    with pytest.raises(UserError, match="merge.density"):
        MergeSettings.of({"density": "half"})
    with pytest.raises(UserError, match="merge.rule='nope'"):
        MergeSettings.of({"rule": "nope"})
    with pytest.raises(UserError, match=r"data.prompt has unknown keys \['title_seperator'\]"):
        checked(PromptTemplate, {"title_seperator": " ; "}, "data.prompt")
    with pytest.raises(UserError, match="data.prompt.max_length='long'"):
        checked(PromptTemplate, {"max_length": "long"}, "data.prompt")
    assert time.perf_counter() - t0 < 3.0


def test_a_mistyped_recipe_or_prompt_fails_before_the_backbone(tmp_path, monkeypatch):
    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone loaded before the settings were checked")

    monkeypatch.setattr(run, "load_backbone", no_backbone)
    for override, message in [("recipe.warmup_ratio=abc", "recipe.warmup_ratio='abc'"),
                              ("+recipe.warmup=0.1", r"recipe has unknown keys \['warmup'\]"),
                              ("data.prompt.max_length=long", "data.prompt.max_length='long'"),
                              ("+data.prompt.title_seperator=x", "data.prompt has unknown keys")]:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", "logger=none", override])
        t0 = time.perf_counter()
        with pytest.raises(Exception) as e:  # hydra's instantiate wraps the DataModule's error
            run.train(cfg)
        assert re.search(message, str(run.user_error(e.value))), (override, e.value)
        assert time.perf_counter() - t0 < 3.0, override
