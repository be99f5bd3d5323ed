"""load_backbone: built-in, local-folder and failing names; freezing; dtype; LoRA targets; the atomic cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import pytest
import torch

from recsys.models.backbone import (
    BACKBONES,
    CACHE_MARKER,
    Backbone,
    backbone_cache_dir,
    build_tiny,
    cached_pretrained,
    default_lora_targets,
    load_backbone,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_frozen(b: Backbone):
    assert not any(p.requires_grad for p in b.model.parameters())
    assert not b.model.training
    assert b.tokenizer.padding_side == "right" and b.tokenizer.pad_token is not None


@pytest.mark.parametrize(
    "name,kind,cls", [("tiny:encoder", "encoder", "BertModel"), ("tiny:decoder", "decoder", "LlamaForCausalLM")]
)
def test_tiny_loads_frozen(name, kind, cls):
    b = load_backbone(name)
    assert (b.name, b.kind, type(b.model).__name__, b.hidden_size) == (name, kind, cls, 32)
    assert_frozen(b)
    same = load_backbone(name)
    assert all(torch.equal(p, q) for p, q in zip(b.model.parameters(), same.model.parameters()))
    assert load_backbone(name, hidden_size=16, num_layers=1).hidden_size == 16


def test_dtype():
    assert load_backbone("tiny:decoder", dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_backbone("tiny:encoder", dtype="auto").model.dtype == torch.float32
    with pytest.raises(ValueError, match="backbone.dtype"):
        load_backbone("tiny:encoder", dtype="fp32")


@pytest.mark.parametrize("name", ["tiny:gpt", "embedded:bert"])
def test_unknown_builtin_names(name):
    with pytest.raises(ValueError) as e:
        load_backbone(name)
    assert name in str(e.value) and all(n in str(e.value) for n in BACKBONES)


def test_builtin_kind_must_match():
    with pytest.raises(ValueError, match="encoder"):
        load_backbone("tiny:encoder", kind="decoder")


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(ValueError) as e:
        load_backbone(str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value) and all(n in str(e.value) for n in BACKBONES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_backbone(str(tmp_path / "empty"))


def test_unreachable_hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as e:
        load_backbone("nobody-here/no-such-model")
    msg = str(e.value)
    assert "nobody-here/no-such-model" in msg and "offline" in msg and all(n in msg for n in BACKBONES)


@pytest.mark.parametrize("name,kind", [("tiny:encoder", "encoder"), ("tiny:decoder", "decoder")])
def test_local_folder(tmp_path, name, kind):
    tiny = build_tiny(name, seed=3)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    b = load_backbone(str(tmp_path))
    assert b.kind == kind and type(b.model) is type(tiny.model)
    assert_frozen(b)
    ref = tiny.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in b.model.state_dict().items())
    assert default_lora_targets(b) == default_lora_targets(tiny)


def test_local_folder_kind_override(tmp_path):
    tiny = build_tiny("tiny:decoder")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    b = load_backbone(str(tmp_path), kind="encoder")
    assert b.kind == "encoder" and type(b.model).__name__ == "LlamaModel"


def test_minilm_loads_and_embeds():
    b = load_backbone("embedded:minilm-l6")
    assert b.kind == "encoder" and b.hidden_size == 384
    assert sum(p.numel() for p in b.model.parameters()) == 22_713_216
    assert_frozen(b)
    texts = ["a plush dinosaur toy for kids", "stuffed dinosaur for children", "stainless steel chef knife"]
    batch = b.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = b.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling
    emb = torch.nn.functional.normalize(mean, dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 > sim[0, 2]


def test_default_lora_targets():
    from transformers import AutoModel, AutoModelForCausalLM, DistilBertConfig, GPT2Config

    assert default_lora_targets(load_backbone("tiny:encoder")) == ["query", "value"]
    assert default_lora_targets(load_backbone("tiny:decoder")) == LLAMA_TARGETS
    distil_config = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    distil = AutoModel.from_config(distil_config)
    assert default_lora_targets(distil, kind="encoder") == ["q_lin", "v_lin"]
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert default_lora_targets(gpt2) == ["c_attn", "c_proj", "c_fc"]  # Conv1D layers; kind from the config


def test_default_lora_targets_on_peft_model():
    from peft import LoraConfig, get_peft_model

    b = load_backbone("tiny:decoder")
    peft_model = get_peft_model(b.model, LoraConfig(r=2, target_modules=default_lora_targets(b)))
    assert default_lora_targets(peft_model, kind="decoder") == LLAMA_TARGETS


def _tiny_build(calls):
    def build(progress):
        calls.append(1)
        tiny = build_tiny("tiny:encoder", seed=1)
        return tiny.model, tiny.tokenizer

    return build


def test_cached_pretrained_builds_once(tmp_path):
    calls = []
    path = str(tmp_path / "cache" / "tiny")
    assert cached_pretrained(_tiny_build(calls), path) == path
    assert cached_pretrained(_tiny_build(calls), path) == path
    assert len(calls) == 1
    assert os.path.isfile(os.path.join(path, CACHE_MARKER))
    assert os.listdir(tmp_path / "cache") == ["tiny"]  # no temporary folders left beside it
    b = load_backbone(path)
    expected = build_tiny("tiny:encoder", seed=1).model.embeddings.word_embeddings.weight
    assert b.kind == "encoder" and torch.equal(b.model.embeddings.word_embeddings.weight, expected)


def test_cached_pretrained_ignores_folder_without_marker(tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text("{half written")
    calls = []
    cached_pretrained(_tiny_build(calls), str(path))
    assert len(calls) == 1 and (path / CACHE_MARKER).is_file()
    assert load_backbone(str(path)).kind == "encoder"
    assert sorted(os.listdir(tmp_path)) == ["tiny"]


def test_cached_pretrained_failed_build_leaves_nothing(tmp_path):
    def broken(progress):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_pretrained(broken, str(tmp_path / "tiny"))
    assert os.listdir(tmp_path) == []


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path))
    assert backbone_cache_dir() == str(tmp_path / "backbones")
    assert backbone_cache_dir("/x/y") == "/x/y"


@pytest.mark.slow
def test_smollm2_loads_and_chats():
    """De-quantises the GGUF file into the real cache on first use (~25 s), then loads in about a second."""
    b = load_backbone("embedded:smollm2-135m")
    assert b.kind == "decoder" and type(b.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in b.model.parameters()) == 134_515_008
    assert_frozen(b)
    assert os.path.isfile(os.path.join(backbone_cache_dir(), "smollm2-135m", CACHE_MARKER))
    assert default_lora_targets(b) == LLAMA_TARGETS
    tok = b.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = b.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_minilm_half_copy_loads_through_the_env_override(tmp_path, monkeypatch):
    """benchmarks/gpu_prepare.sh's float16 MiniLM: the same tokenizer, outputs within float16 rounding,
    loaded by the embedded name through $RECSYS_MINILM_DIR (also the tiny backbones' tokenizer)."""
    from recsys.models.backbone import MINILM_DIR_ENV, save_minilm_half

    ref = load_backbone("embedded:minilm-l6")
    save_minilm_half(str(tmp_path / "half"))
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path / "half"))
    half = load_backbone("embedded:minilm-l6")
    assert half.name == "embedded:minilm-l6" and next(half.model.parameters()).dtype == torch.float32
    text = ["User bought: red hat ; blue shoe [SEP] Next item: green sock"]
    a, b = ref.tokenizer(text, return_tensors="pt"), half.tokenizer(text, return_tensors="pt")
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    with torch.no_grad():
        ha, hb = ref.model(**a).last_hidden_state, half.model(**b).last_hidden_state
    torch.testing.assert_close(hb, ha, rtol=0, atol=2e-2)
    assert load_backbone("tiny:decoder").tokenizer.vocab_size == ref.tokenizer.vocab_size
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="RECSYS_MINILM_DIR"):
        load_backbone("tiny:encoder")
