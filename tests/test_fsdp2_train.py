"""trainer=fsdp2: FSDP2 through Lightning's ModelParallelStrategy with memory-light loading (a hollow backbone that
``RecModule.configure_model`` shards, each rank reading its rows, ``recsys.models.sharded_load.shard_and_load``).

Fast: the preset builds its strategy; the settings checks refuse what it does not support, in one line; a hollow
model holds no weights and peft initialises its LoRA as on the loaded model.
Slow: the real ``train.py`` on 2 CPU processes (gloo) against 1 process on a small saved decoder: the same zero-shot
and test metrics, the same weights after training, an exported adapter that plain peft loads, and each rank's
memory growth while loading about half the model's.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


def compose(*overrides):
    return compose_config("train", "paths.output_dir=/tmp/recsys-test-fsdp2", *overrides)


def test_fsdp2_preset_builds_a_model_parallel_strategy_over_all_ranks():
    from lightning.pytorch.strategies import ModelParallelStrategy

    c = compose("trainer=fsdp2", "trainer.accelerator=cpu")
    strategy = hydra.utils.instantiate(c.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy) and type(strategy).__name__ == "FSDP2Strategy"
    assert strategy._data_parallel_size == "all" and strategy._tensor_parallel_size == 1
    assert strategy._save_distributed_checkpoint is False  # one file: resume and the checkpoint checks read it


@pytest.mark.parametrize("overrides,says", [
    (["method=xcross", "data.target=tools", "data.sources=[toys]", "backbone=hf", "backbone.name=/x"],
     "method=xcross"),
    (["method=joint", "data.target=tools", "data.sources=[toys]", "backbone=hf", "backbone.name=/x"], "method=joint"),
    (["backbone=tiny_decoder"], "backbone.name=tiny:decoder"),
    (["backbone=hf", "backbone.name=/x", "protocol=paper", "method.module.scoring=likelihood"], "protocol=paper"),
])
def test_fsdp2_refuses_what_it_does_not_support_before_loading(overrides, says):
    from recsys.core.errors import UserError
    from recsys.pipeline import checks

    c = compose("trainer=fsdp2", *overrides)
    with pytest.raises(UserError, match="trainer=fsdp2") as e:
        checks.config(c)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_hollow_model_holds_no_weights_and_takes_the_loaded_model_s_lora(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from recsys.models.sharded_load import hollow, is_hollow
    from recsys.models.shapes import meta_model

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(3)
    loaded = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), LoraConfig(**lora))
    torch.manual_seed(3)
    empty = hollow(meta_model(config, "decoder"))
    assert all(is_hollow(p) for p in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight  # tied weights stay tied
    empty = get_peft_model(empty, LoraConfig(**lora))
    mine = {n: p for n, p in empty.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and len(mine) == 12
    for name, p in theirs.items():
        assert torch.equal(mine[name], p), name  # the same random numbers drawn, on the CPU


# ---------------------------------------------------------------------------------------------- train.py (slow)
def save_decoder(folder: Path) -> int:
    """A random 2-layer Llama (hidden 256, MiniLM's tokenizer: 64 MiB in float32, most of it the untied embedding
    and LM head) saved with save_pretrained; returns its size in bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recsys.models.backbone import _minilm_dir, _tokenizer

    tok = _tokenizer(_minilm_dir(), "decoder")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def train(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "1"}
    p = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"train.py {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


def trained_weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow  # two train.py runs, one of 2 processes: ~40 s on a loaded 2-core machine
def test_fsdp2_two_processes_train_as_one_and_each_rank_loads_half(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    size = save_decoder(tmp_path / "decoder")
    # LoRA dropout 0: the ranks' dropout masks would differ from one process's; 3 optimizer steps
    base = [f"backbone=hf", f"backbone.name={tmp_path / 'decoder'}", "backbone.dtype=float32",
            "trainer.precision=32-true", "method.module.dropout=0", "data.max_eval_users=16", "data.eval_batch_size=8",
            "trainer.max_epochs=1", "trainer.limit_train_batches=3", "callbacks.rich_progress_bar=null",
            "logger=none", "export_adapter=force"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(*base, f"hydra.run.dir={one}", f"paths.adapter_store={tmp_path}/store1")
    train(*base, "trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={two}",
          f"paths.adapter_store={tmp_path}/store2")

    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    zero = sorted(k for k in m1 if k.startswith("zero_shot/test/"))
    assert zero and {k: m2[k] for k in zero} == {k: m1[k] for k in zero}  # same loaded weights, same LoRA/head init
    for key in ("test/ndcg@10", "test/mrr", "test/hr@10"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-4), key

    w1, w2 = trained_weights(one), trained_weights(two)
    assert w1.keys() == w2.keys() and any("lora_B" in k for k in w1) and any(k.startswith("head.") for k in w1)
    for name, w in w1.items():
        if name == "head.out.bias":  # its gradient is 0 (softmax over candidates ignores a shift): Adam follows noise
            continue
        torch.testing.assert_close(w2[name], w, rtol=1e-3, atol=1e-5, msg=name)  # float32 sums in another order
    assert any((w1[k] != 0).any() for k in w1 if "lora_B" in k)  # it trained

    # the exported adapter: plain peft on one process reads it, with the weights training ended with
    exported = next((tmp_path / "store2").rglob("adapter_config.json")).parent
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "decoder", dtype=torch.float32),
                                      exported)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == sum("lora_" in k for k in w2)
    for name, p in lora.items():
        assert torch.equal(p, w2["model." + name]), name

    # memory: each rank's resident memory grew by about its half of the model while loading, never the whole
    logs = "".join(p.read_text() for p in two.glob("train*.log"))
    grown = [float(x) for x in re.findall(r"sharded loading: rank \d read [\d.]+ MiB .* resident memory \+?(-?[\d.]+) MiB",
                                         logs)]
    assert len(grown) == 2, logs[-2000:]
    print(f"whole model {size / 2**20:.1f} MiB; resident memory grown while loading, by rank: {grown} MiB")
    assert all(g < 0.75 * size / 2**20 for g in grown)


@pytest.mark.slow  # two train.py runs of 2 processes: ~45 s on a loaded 2-core machine
def test_fsdp2_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    """A checkpoint of trainer=fsdp2 (trainable weights and AdamW state, gathered by FSDP2Strategy) read back by
    trainer=fsdp2: training on from epoch 0's checkpoint ends with the uninterrupted run's weights, exactly."""
    save_decoder(tmp_path / "decoder")
    base = [f"backbone=hf", f"backbone.name={tmp_path / 'decoder'}", "backbone.dtype=float32",
            "trainer.precision=32-true", "method.module.dropout=0", "data.max_eval_users=16", "data.eval_batch_size=8",
            "trainer.max_epochs=2", "trainer.limit_train_batches=3", "callbacks.rich_progress_bar=null",
            "logger=none", "export_adapter=false", "zero_shot=false", "trainer=fsdp2", "trainer.accelerator=cpu",
            "trainer.devices=2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(*base, "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.monitor=null",
          f"hydra.run.dir={whole}")
    train(*base, f"ckpt_path={whole / 'checkpoints' / 'epoch00.ckpt'}", f"hydra.run.dir={resumed}")
    state = torch.load(whole / "checkpoints" / "epoch00.ckpt", map_location="cpu", weights_only=True)
    assert state["optimizer_states"][0]["state"]  # the AdamW moments are in it
    a, b = trained_weights(whole), trained_weights(resumed)
    assert a.keys() == b.keys()
    for name, w in a.items():
        assert torch.equal(b[name], w), name
