"""The plan before the job (recsys/plan.py, recsys/pipeline/plan.py): shipped shapes are the published ones, the
parameter counts are peft's, the memory estimates are within TOLERANCE of measured peaks of a LoRA step on the CPU,
the paper presets plan in seconds, and a SLURM sweep whose plan does not fit is refused before submission."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recsys import CONFIG_DIR
from recsys.core.errors import UserError
from recsys.models.shapes import meta_model, shape_config, shipped_shapes
from recsys.pipeline.plan import DEFAULTS, PlanCheck, Setting, estimate, lora_params, plan_config, shape_of

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25  # estimate / measured peak within 1 +- 0.25
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def compose_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/recsys-test-plan", *overrides],
                       return_hydra_config=True)


PUBLISHED = {  # parameter counts as the model cards give them (millions, rounded)
    "Qwen/Qwen2-7B-Instruct": 7615.6, "Qwen/Qwen2.5-0.5B-Instruct": 494.0, "Qwen/Qwen2.5-1.5B-Instruct": 1543.7,
    "meta-llama/Llama-3.2-1B-Instruct": 1235.8, "embedded:smollm2-135m": 134.5, "embedded:minilm-l6": 22.7}


def test_shipped_shapes_are_the_published_models():
    assert set(shipped_shapes()) == set(PUBLISHED)
    for name, millions in PUBLISHED.items():
        config = shape_config(name)
        model = meta_model(config, "encoder" if "minilm" in name else "decoder")
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions, name
        assert all(p.device.type == "meta" for p in model.parameters())
    from recsys.models.backbone import _minilm_dir  # the embedded MiniLM's own config, where it is installed

    real = json.loads((Path(_minilm_dir()) / "config.json").read_text())
    ours = json.loads((CONFIG_DIR / "backbone" / "shapes" / "embedded--minilm-l6.json").read_text())
    assert {k: real[k] for k in ours} == ours
    with pytest.raises(UserError, match="shipped shapes are"):
        shape_config("someone/unknown-model")


def test_lora_count_is_peft_s_on_the_meta_device():
    import peft

    config = shape_config("Qwen/Qwen2-7B-Instruct")
    model = meta_model(config, "decoder")
    shape = shape_of(model, "decoder")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_LINEAR)))
    assert lora_params(shape, 16, ALL_LINEAR) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape, 16, ALL_LINEAR) == 40_370_176


def small_setting(checkpointing: bool) -> Setting:
    return Setting(method="lora", streams=1, adapters=1, frozen_adapters=0, r=8, targets=ALL_LINEAR, dropout=0.05,
                   scoring="head", heads=0, ranks=1, batch=8, tokens=256, answer_tokens=0, weight_bytes=4,
                   train_bytes=4, act_bytes=4, fsdp=False, checkpointing=checkpointing, accumulate=1, examples=None,
                   plan={**DEFAULTS, "overhead_gb": 0.0})


SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 1024, "tie_word_embeddings": True}


@pytest.mark.slow  # two subprocesses of ~30 s on a loaded 2-core machine
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_within_tolerance_of_the_measured_peak(checkpointing):
    """A LoRA step (forward, backward, AdamW) of a small Qwen2 in float32 on the CPU: what it adds to the resident
    memory at its peak (activations, gradients, optimizer state) against the plan's rows for the same setting."""
    from transformers import Qwen2Config

    st = small_setting(checkpointing)
    spec = {"shape": SMALL, "batch": st.batch, "tokens": st.tokens, "r": st.r, "dropout": st.dropout,
            "targets": list(ALL_LINEAR), "checkpointing": checkpointing}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "plan_measure.py"), json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    measured = json.loads(p.stdout.strip().splitlines()[-1])
    est = estimate(shape_of(meta_model(Qwen2Config(**SMALL), "decoder"), "decoder"), st)
    assert est["params"]["trainable"] == measured["trainable"]
    rows = est["rows"]
    step = rows["activations"] + rows["gradients"] + rows["optimizer state (AdamW)"]
    ratio = step / measured["peak_above_start"]
    print(f"checkpointing={checkpointing}: estimated {step / 2**20:.1f} MiB, measured "
          f"{measured['peak_above_start'] / 2**20:.1f} MiB, ratio {ratio:.2f}")
    assert abs(ratio - 1) <= TOLERANCE, ratio


def test_paper_presets_plan_on_the_cpu_without_network(capsys):
    from recsys.plan import main

    assert main(["experiment=weaverec_paper", "trainer=fsdp", "trainer.devices=8"]) == 0
    out = capsys.readouterr().out
    for row in ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations",
                "checkpointing off", "FSDP gathered units", "total a GPU", "optimizer steps", "FLOPs"):
        assert row in out, row
    assert "FSDP over 8" in out and ": fits" in out
    assert main(["experiment=xcross_paper", "+plan.examples=100000"]) == 0
    out = capsys.readouterr().out
    assert "DDP x 8" in out and "2 stream(s)" in out and "optimizer steps" in out


def test_fsdp_shards_what_ddp_replicates():
    _, ddp_st, ddp = plan_config(compose_cfg("experiment=weaverec_paper"))
    _, fsdp_st, fsdp = plan_config(compose_cfg("experiment=weaverec_paper", "trainer=fsdp"))
    for row in ("frozen weights", "trainable weights", "gradients", "optimizer state (AdamW)"):
        assert fsdp["rows"][row] == pytest.approx(ddp["rows"][row] / 8)
    assert fsdp["rows"]["activations"] == ddp["rows"]["activations"]
    assert ddp_st.streams == 3 and ddp_st.adapters == 3  # WeaveRec: target + 2 hybrids at once
    assert ddp["rows"]["frozen weights"] == pytest.approx(7_615_616_512 * 2)


def test_a_slurm_sweep_that_does_not_fit_is_refused(capsys):
    check = PlanCheck()
    big = ["experiment=weaverec_paper", "hydra/launcher=slurm", "speed.activation_checkpointing=false"]
    with pytest.raises(SystemExit) as e:
        check.on_multirun_start(compose_cfg(*big))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused before submission" in err and "GiB a GPU" in err
    assert "+plan.check=false" in err
    check.on_multirun_start(compose_cfg(*big, "+plan.check=false"))  # overridden: no refusal
    check.on_multirun_start(compose_cfg("experiment=weaverec_paper", "hydra/launcher=slurm",
                                        "hydra.launcher.mem_gb=160"))  # fits
    check.on_multirun_start(compose_cfg(*big[::2]))  # not SLURM: nothing checked
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # 8 ranks x 14.2 GiB of weights loaded on one node > the launcher's 64 GB
        check.on_multirun_start(compose_cfg("experiment=weaverec_paper", "hydra/launcher=slurm"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hydra.launcher.mem_gb=64" in err and "Set hydra.launcher.mem_gb=" in err


def test_the_plan_refuses_what_trainer_fsdp2_refuses(capsys):
    """A plan of a run train.py would refuse is no plan: recsys.plan and the SLURM check say why, in one line."""
    from recsys.plan import main

    assert main(["experiment=weaverec_paper_lora", "trainer=fsdp2", "trainer.devices=8"]) == 2  # protocol=paper
    assert "trainer=fsdp2 supports protocol=ranking only" in capsys.readouterr().err
    assert main(["experiment=xcross_paper_source", "trainer=fsdp2", "trainer.devices=8"]) in (0, 1)
    assert "each rank reads its shard" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        PlanCheck().on_multirun_start(compose_cfg("experiment=xcross_paper", "trainer=fsdp2", "hydra/launcher=slurm"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "refused before submission" in err and "method=xcross" in err


@pytest.mark.slow
def test_train_py_refuses_the_sweep_before_sbatch(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=weaverec_paper", "hydra/launcher=slurm",
                        "speed.activation_checkpointing=false", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "refused before submission" in p.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()
