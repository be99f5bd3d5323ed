"""Backbone options (conf/backbone/hf.yaml) reach from_pretrained, and each preset for the papers'
backbones composes and builds its model from its config: the preset's settings on a local folder
holding random weights of the same architecture at a tiny depth and width (the real weights cannot be
downloaded here), with its own tokenizer folder, and LoRA on the preset's target modules."""

from pathlib import Path

import pytest
from conftest import compose_config
import torch

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = {  # preset -> the transformers config class of its architecture
    "qwen2_7b_instruct": "Qwen2Config", "qwen2_5_0_5b": "Qwen2Config", "qwen2_5_1_5b": "Qwen2Config",
    "llama3_2_1b": "LlamaConfig",
}


def compose_train(*overrides):
    return compose_config("train", "paths.output_dir=/tmp/recsys-test-presets", *overrides)


def test_every_preset_is_tested():
    found = {p.stem for p in (CONF / "backbone").glob("*.yaml")} - {"hf", "minilm", "smollm2", "tiny_encoder", "tiny_decoder"}
    assert found == set(PRESETS)


def test_hf_options_reach_from_pretrained(monkeypatch):
    import recsys.pipeline.run as run

    seen = {}
    monkeypatch.setattr(run, "load_backbone", lambda name, **kw: seen.update(name=name, **kw))
    cfg = compose_train("backbone=hf", "backbone.name=org/model", "backbone.revision=abc123",
                        "backbone.trust_remote_code=true", "backbone.attn_implementation=eager",
                        "backbone.tokenizer=/tok", "backbone.lora_target_modules=[q_proj]")
    run.build_backbone(cfg)
    assert seen["name"] == "org/model" and seen["tokenizer"] == "/tok" and seen["lora_targets"] == ["q_proj"]
    assert (seen["revision"], seen["trust_remote_code"], seen["attn_implementation"]) == ("abc123", True, "eager")
    seen.clear()
    run.build_backbone(compose_train("backbone=hf", "backbone.name=org/model"))
    assert seen["name"] == "org/model"  # unset options are not passed: transformers' own defaults apply
    assert not {"revision", "trust_remote_code", "attn_implementation"} & set(seen)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from recsys.models.backbone import build_tiny

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tiny("tiny:decoder").tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds(preset, tmp_path, tokenizer_folder):
    import transformers

    from recsys.methods.lora import LoRAModule
    from recsys.pipeline.run import build_backbone

    cfg = compose_train(f"backbone={preset}")
    b = cfg.backbone
    assert b.name.startswith(("Qwen/", "meta-llama/")) and b.lora_target_modules and b.attn_implementation == "sdpa"
    assert cfg.speed.activation_checkpointing == b.gradient_checkpointing  # the preset's switch, one place
    # the preset's architecture at a tiny depth and width, random weights, in a local folder of its own
    config = getattr(transformers, PRESETS[preset])(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, architectures=[PRESETS[preset].replace("Config", "ForCausalLM")])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "weights")
    cfg.backbone.name, cfg.backbone.tokenizer = str(tmp_path / "weights"), str(tokenizer_folder)
    backbone = build_backbone(cfg)
    assert backbone.kind == "decoder" and type(backbone.model).__name__ == PRESETS[preset].replace("Config", "ForCausalLM")
    assert backbone.model.dtype == torch.bfloat16 and backbone.model.config._attn_implementation == "sdpa"
    assert backbone.tokenizer.pad_token is not None
    module = LoRAModule(backbone, r=4)
    wrapped = {n.split(".")[-1] for n, m in module.model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(b.lora_target_modules)
    assert sum(hasattr(m, "lora_A") for m in module.model.modules()) == 2 * len(b.lora_target_modules)
