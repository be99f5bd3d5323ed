"""Hydra configs: every experiment and every group option composes; the composed train/eval configs
resolve, and their objects instantiate from ``_target_``."""

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
NOT_STANDALONE = {"data": {"common"}}  # shared bases, included by the real options


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if p.stem not in NOT_STANDALONE.get(group, ()))


def _compose(overrides=(), name="train", hydra_cfg=False, tmp="/tmp/recsys-test-configs"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={tmp}", *overrides], return_hydra_config=hydra_cfg)


def domains(c: dict) -> set:
    """The domains a data config offers: its own specs and the plain folders found under its root."""
    from recsys.data.datamodule import plain_domains

    return set(c["data"]["domains"]) | set(plain_domains(c["data"].get("root")))


def resolved(cfg) -> dict:
    """Resolve everything except the ``hydra`` node (its interpolations need a running app)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_train_yaml_resolves():
    c = resolved(_compose())
    assert c["method"]["name"] == "lora" and c["data"]["target"] == "tools"
    assert c["data"]["cache_dir"] == c["paths"]["cache_dir"]
    assert c["callbacks"]["model_checkpoint"]["monitor"] == c["optimized_metric"] == "val/ndcg@10"
    assert c["trainer"]["use_distributed_sampler"] is False  # the DataModule shards by itself


def test_eval_yaml_resolves():
    c = resolved(_compose(name="eval"))
    assert c["split"] == "test" and c["run_dir"] is None and c["adapter"] is None


def test_hydra_node_composes():
    cfg = _compose(hydra_cfg=True)
    assert cfg.hydra.job.chdir is False
    assert "${now:" in OmegaConf.to_yaml(cfg.hydra.run, resolve=False)


EXPERIMENTS = options("experiment")


@pytest.mark.parametrize("experiment", EXPERIMENTS or [pytest.param(None, marks=pytest.mark.skip("conf/experiment is empty"))])
def test_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    c = resolved(cfg)
    assert c["data"]["target"] in domains(c)
    assert all(s in domains(c) and s != c["data"]["target"] for s in c["data"]["sources"])
    assert c["method"]["module"]["_target_"]


def test_found_every_group():
    for group in ("data", "backbone", "method", "trainer", "logger", "callbacks", "paths", "debug"):
        assert options(group), group


@pytest.mark.parametrize("group", ["data", "backbone", "method", "trainer", "logger", "callbacks", "debug", "speed",
                                   "hparams_search"])
def test_group_options_compose(group):
    opts = options(group)
    if not opts:
        pytest.skip(f"conf/{group} is empty")
    for opt in opts:
        overrides = [f"{group}={opt}"]
        if group == "backbone" and opt == "hf":
            overrides.append("backbone.name=some/model")  # hf needs a name (mandatory ???)
        if group == "hparams_search":
            overrides.append("run_name=trial-0")  # trial-${hydra:job.num}: needs a running sweep (test_scale.py)
        if group == "data" and opt == "raw":
            overrides.append("data.root=/nonexistent")  # composing reads nothing
        c = resolved(_compose(overrides))
        if group == "data":
            assert "_target_" not in c["data"]  # the pipeline builds the typed settings (RecDataModule.from_config)
            assert c["data"]["target"] in domains(c)
        if group == "backbone":
            assert c["backbone"]["name"]
        if group == "method":
            assert c["method"]["name"] and c["method"]["module"]["_target_"]


@pytest.mark.parametrize("data", options("data"))
def test_datamodule_instantiates(data):
    """The data configs build a RecDataModule (its constructor validates, reading nothing)."""
    c = _compose([f"data={data}"])
    from recsys.data.datamodule import RecDataModule

    dm = RecDataModule.from_config(OmegaConf.to_container(c.data, resolve=True))
    assert dm.target == c.data.target and set(dm.domain_specs) == domains(OmegaConf.to_container(c, resolve=True))


def test_cpu_trainer_callbacks_and_loggers_instantiate(tmp_path):
    c = _compose(["logger=csv", "trainer.max_epochs=1"], tmp=str(tmp_path))
    callbacks = [hydra.utils.instantiate(x) for x in c.callbacks.values()]
    assert {type(x).__name__ for x in callbacks} >= {"RunCheckpoint", "EarlyStopping"}
    loggers = [hydra.utils.instantiate(x) for x in c.logger.values()]
    trainer = hydra.utils.instantiate(c.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == 1
    c = _compose(["logger=wandb"], tmp=str(tmp_path))
    assert resolved(c)["logger"]["wandb"]["mode"] in ("online", "offline", "disabled")


def test_debug_presets_are_tiny():
    c = resolved(_compose(["debug=fdr"]))
    assert c["backbone"]["name"] == "tiny:encoder" and c["trainer"]["fast_dev_run"] is True


def test_unknown_option_fails():
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises((MissingConfigException, ConfigCompositionException)):
        _compose(["method=nope"])


RECIPE_KEYS = ("scheduler", "warmup_ratio", "optimizer")  # in method.module; epochs, batch and clipping elsewhere


def recipe_of(c: dict) -> dict:
    """What a composed config trains with: optimizer (class, lr, decay), schedule, epochs, batch, clipping."""
    m = c["method"]["module"]
    return {**{k: m[k] for k in RECIPE_KEYS}, "max_epochs": c["trainer"]["max_epochs"],
            "batch_size": c["data"]["batch_size"], "gradient_clip_val": c["trainer"]["gradient_clip_val"]}


@pytest.mark.parametrize("setting", [[], ["experiment=amazon_lora_cpu"], ["experiment=[weaverec_amazon,weaverec_cpu]", "data.target=games"],
                                     ["experiment=weaverec_synthetic"], ["protocol=paper", "backbone=tiny_decoder"]])
def test_every_method_trains_with_the_one_recipe(setting):
    """Rows of a table differ only in the method: every trained method composes to the same recipe,
    which is conf/recipe's (X-Cross's integrators alone have their own lr, marked [ours])."""
    # merge_sources trains nothing; sasrec (an ID model trained from scratch) has its own recipe, recipe/sasrec.yaml
    methods = [m for m in options("method") if m not in ("merge_sources", "sasrec")]
    recipes = {}
    for m in methods:
        if m == "xcross" and "protocol=paper" in setting:
            continue  # X-Cross refuses the paper protocol
        c = resolved(_compose([*setting, f"method={m}", "data.sources=[toys]"]))
        recipes[m] = recipe_of(c)
        assert recipes[m]["optimizer"] == c["recipe"]["optimizer"]
        assert (recipes[m]["max_epochs"], recipes[m]["batch_size"]) == (c["recipe"]["max_epochs"], c["recipe"]["batch_size"])
    first = recipes[methods[0]]
    assert all(r == first for r in recipes.values()), recipes


def test_a_method_cannot_take_its_own_learning_rate():
    """The recipe is one node: a method-level lr override is refused (set recipe.optimizer.lr)."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method.module.optimizer.lr"):
        _compose(["method.module.optimizer.lr=0.01"])
    assert resolved(_compose(["recipe.optimizer.lr=0.01", "method=weaverec", "data.sources=[toys]"]))["method"]["module"]["optimizer"]["lr"] == 0.01



@pytest.mark.parametrize("override", ["method.module.optimizer={_target_:torch.optim.AdamW,_partial_:true,lr:0.01}",
                                      "method.module.warmup_ratio=0.3", "method.module.scheduler=constant"])
def test_replacing_the_methods_recipe_node_is_refused_too(override, tmp_path):
    """Replacing the whole method.module.optimizer node (or the schedule) would give one method its own learning
    rate: train() refuses it as the composition refuses method.module.optimizer.lr, before anything loads."""
    from recsys.core.errors import UserError
    from recsys.pipeline.run import check_recipe_keys, train

    cfg = _compose([override, "logger=none"], tmp=str(tmp_path))
    with pytest.raises(UserError, match=f"method.module.{override.split('=')[0].split('.')[-1]} is set by the method"):
        train(cfg)
    for method in ("lora", "xcross", "weaverec", "joint", "sasrec", "merge_sources"):
        check_recipe_keys(_compose([f"method={method}"], tmp=str(tmp_path)))  # every shipped config passes
