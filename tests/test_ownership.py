"""Nothing written into a module or the DataModule from outside (CONTRIBUTING.md, "Rules"), and one
place for what the pipeline asks a method.

- ``recsys/pipeline`` assigns no attribute of another object: the per-user ranks folder reaches the
  evaluations through a callback (``tracking.RankWriter``), the adapters a run read reach the loggers as a
  return value (``RecModule.input_adapters``), an evaluation's own folder a trained run's config by merge.
- A method's name and kind are class attributes (``RecModule.name``, ``kind``), the same as its config's.
- The recipe's values live in ``conf/recipe/default.yaml`` only; ``Recipe`` holds their names and types.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import recsys.models.adapter_store as adapter_store
from recsys.core.errors import UserError, checked
from recsys.methods.base import KINDS, Recipe, RecModule, method_classes
from recsys.pipeline.tracking import RankWriter

ROOT = Path(__file__).resolve().parents[1]
# the objects whose attributes the pipeline may set: its own (self), configs, and these, each with its reason
ALLOWED = {
    "self": "an object's own state",
    "cfg": "a config", "run_cfg": "a config", "sub": "a config (a stage's copy of the run's)",
    "trainer": "the zero-shot test hides the loggers from its own test (run.zero_shot_test)",
    "fabric_launcher": "Lightning's subprocess launcher patched for Hydra (scale.py)",
    "pl_launcher": "Lightning's subprocess launcher patched for Hydra (scale.py)",
}


def outside_writes(source: str) -> list[tuple[int, str]]:
    """(line, code) of each attribute assignment to an object not in ALLOWED, and each setattr/delattr."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else \
            node.targets if isinstance(node, ast.Delete) else []
        for target in targets:
            for e in ast.walk(target):
                if isinstance(e, ast.Attribute) and isinstance(e.ctx, (ast.Store, ast.Del)):
                    base = e.value
                    while isinstance(base, (ast.Attribute, ast.Subscript)):
                        base = base.value
                    if not (isinstance(base, ast.Name) and base.id in ALLOWED):
                        found.append((node.lineno, ast.unparse(e)))
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("setattr", "delattr", "__setattr__"):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_pipeline_writes_no_attribute_of_a_module_or_the_datamodule():
    bad = [f"recsys/pipeline/{p.name}:{line}: {code}" for p in sorted((ROOT / "recsys" / "pipeline").glob("*.py"))
           for line, code in outside_writes(p.read_text())]
    assert not bad, "written from outside (pass it through RunInfo, a callback or a return value):\n" + "\n".join(bad)


def test_the_check_sees_each_way_of_writing():
    code = "module.ranks_dir = d\ndm.mix = 'x'\nmodule.head.scale += 1\nsetattr(dm, 'seed', 1)\n" \
           "object.__setattr__(module, 'x', 1)\ndel module.x\nbackbone.kind: str = 'x'\ncfg.paths = p\nself.x = 1\n"
    assert sorted(line for line, _ in outside_writes(code)) == [1, 2, 3, 4, 5, 6, 7]


def test_no_module_level_list_of_read_adapters():
    assert not hasattr(adapter_store, "READ")


def method_configs() -> dict[str, dict]:
    from hydra import compose, initialize_config_dir

    out = {}
    for path in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"method={path.stem}"])
        out[path.stem] = OmegaConf.to_container(cfg.method, resolve=False)
    return out


def test_a_methods_name_and_kind_are_class_attributes_matching_its_config():
    classes = method_classes()
    configs = method_configs()
    assert sorted(classes) == sorted(configs)
    for name, cfg in configs.items():
        module_path, _, cls_name = cfg["module"]["_target_"].rpartition(".")
        cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
        assert cls is classes[name] and cls.name == cfg["name"] == name
        assert cls.kind in KINDS, (name, cls.kind)
    assert [n for n, c in classes.items() if c.kind == "lora"] == ["joint", "lora"]  # evaluate.py adapter=


def test_the_recipe_has_one_source():
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(Recipe)), "Recipe's values belong in conf/recipe/default.yaml"
    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "recipe" / "default.yaml"), resolve=True)
    assert dataclasses.asdict(Recipe.default()) == yaml
    with pytest.raises(UserError, match=r"recipe lacks the keys \['patience'\]"):
        checked(Recipe, {k: v for k, v in yaml.items() if k != "patience"}, "recipe")


class Linear(RecModule):
    def __init__(self, **kwargs):
        super().__init__(None, **kwargs)
        self.w = nn.Linear(4, 1)

    def score(self, batch: dict) -> torch.Tensor:
        return self.w(batch["x"]).squeeze(-1)


def test_a_module_built_without_a_recipe_takes_the_default_recipe():
    recipe = Recipe.default()
    module = Linear()
    assert (module.scheduler, module.warmup_ratio) == (recipe.scheduler, recipe.warmup_ratio)
    opt = module.optimizer_factory(module.trainable_parameters())
    assert type(opt).__name__ == recipe.optimizer["_target_"].rsplit(".", 1)[-1]
    assert opt.defaults["lr"] == recipe.optimizer["lr"] and opt.defaults["weight_decay"] == recipe.optimizer["weight_decay"]
    assert Linear(scheduler="constant", warmup_ratio=0.0).scheduler == "constant"


def test_ranks_are_written_by_the_callback_only(tmp_path):
    """A module keeps only its last evaluation's ranks; the trainer's RankWriter writes them (none without)."""
    from recsys.evaluation import ranks

    module = Linear()
    for _ in range(3):
        module.rank_log.add("test", torch.arange(4.0), 5)
        module.rank_log.close("test")
    r, counts = module.rank_log.take("test")
    assert r.tolist() == [0, 1, 2, 3] and counts.tolist() == [5] * 4  # not three evaluations' worth
    assert module.rank_log.take("test")[0].size == 0

    x = torch.randn(8, 3, 4)
    batches = [{"x": x[i:i + 4], "labels": torch.zeros(4, dtype=torch.long)} for i in (0, 4)]
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[RankWriter(tmp_path)])
    trainer.test(module, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)  # by hand: no examples to name rows
    assert not (tmp_path / ranks.FILE).exists() and module.rank_log.take("test")[0].size == 0
