"""The papers' setups as presets (conf/experiment/weaverec_paper*.yaml, xcross_paper*.yaml): each composes on its own,
with trainer=fsdp, with the SLURM launcher and with the multi-node cluster preset, and holds the papers' numbers."""

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from recsys import CONFIG_DIR

PRESETS = ["weaverec_paper", "weaverec_paper_lora", "xcross_paper", "xcross_paper_source"]
SHAPES = [[], ["trainer=fsdp"], ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
          ["hydra/launcher=slurm", "trainer=fsdp"], ["cluster=slurm_multinode", "trainer.num_nodes=2"]]


def compose_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/recsys-test-paper", *overrides],
                       return_hydra_config=True)


def plain(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shape", SHAPES, ids=["node", "fsdp", "slurm", "slurm-fsdp", "multinode"])
def test_preset_composes_for_a_node_and_for_slurm(preset, shape):
    cfg = compose_cfg(f"experiment={preset}", *shape)
    c = plain(cfg)
    assert c["backbone"]["name"] == "Qwen/Qwen2-7B-Instruct" and c["trainer"]["precision"] == "bf16-true"
    devices, nodes = c["trainer"]["devices"], c["trainer"].get("num_nodes", 1)
    assert c["recipe"]["batch_size"] * c["trainer"]["accumulate_grad_batches"] == 128  # the effective batch, any N
    assert c["data"]["batch_size"] % (devices * nodes) == 0  # the global batch splits over the ranks
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == ("FSDPStrategy" if "trainer=fsdp" in shape else "DDPStrategy")
    if any("launcher" in s or "cluster" in s for s in shape):
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert launcher["_target_"].endswith("SlurmLauncher")
        assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, devices, devices)
    hydra.utils.instantiate(cfg.method.module, _partial_=True)  # the module's keys are its constructor's


def test_weaverec_paper_is_the_release():
    c = plain(compose_cfg("experiment=weaverec_paper"))
    assert c["method"]["name"] == "weaverec" and c["protocol"] == "paper" and c["data"]["protocol"] == "paper"
    m, r = c["method"]["module"], c["recipe"]
    assert (m["r"], m["alpha"], m["dropout"], m["scoring"]) == (16, 32, 0.05, "likelihood")
    assert (r["optimizer"]["lr"], r["warmup_ratio"], r["max_epochs"], r["scheduler"]) == (2e-4, 0.05, 2, "cosine")
    assert m["optimizer"]["lr"] == 2e-4  # the module reads the recipe
    d = c["data"]
    assert (d["hybrid_cap"], d["max_train_examples"], d["num_negatives"], d["train_on_val"]) == (40000, 30000, 29, True)
    assert (d["target"], d["sources"], d["year"], d["k_core"]) == ("sports", ["beauty", "clothing"], 2014, 5)
    assert c["backbone"]["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"]
    assert c["trainer"]["devices"] * c["data"]["batch_size"] // c["trainer"]["devices"] == 16  # 2 a GPU on 8
    lora = plain(compose_cfg("experiment=weaverec_paper_lora"))
    assert lora["method"]["name"] == "lora" and lora["method"]["module"]["r"] == 16 and lora["data"]["sources"] == []


def test_xcross_paper_marks_what_the_paper_leaves_open():
    c = plain(compose_cfg("experiment=xcross_paper"))
    assert c["method"]["name"] == "xcross" and c["data"]["target"] == "tools" and c["data"]["sources"][0] == "toys"
    assert c["method"]["source_experiment"] == "xcross_paper_source"
    src = plain(compose_cfg("experiment=xcross_paper_source"))
    assert src["method"]["name"] == "lora" and src["method"]["module"]["r"] == 8
    assert src["backbone"]["lora_target_modules"] == ["q_proj", "v_proj"]
    assert {k: src[k] for k in ("data", "backbone", "recipe")} == {k: c[k] for k in ("data", "backbone", "recipe")} | {
        "data": {**c["data"], "target": "toys", "sources": []}}
    text = (CONFIG_DIR / "experiment" / "xcross_paper_source.yaml").read_text()
    for key in ("backbone: qwen2_7b_instruct", "year:", "max_history:", "num_negatives:", "lr:", "max_epochs:"):
        line = next(ln for ln in text.splitlines() if key in ln)
        assert "[ours]" in line, line
