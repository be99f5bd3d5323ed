"""Adapters ready to share (recsys/models/card.py): an exported adapter folder has a model card stating what its
manifest holds, the base model's hub name in adapter_config.json, loads with plain peft, and the card's two lines
load it with its head."""

import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from recsys.methods.lora import LoRAModule
from recsys.models.adapter_store import AdapterStore, run_record
from recsys.models.backbone import build_tiny
from recsys.models.card import base_model, card_text


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    module = LoRAModule(build_tiny("tiny:decoder"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter is not the identity
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"recipe": {"optimizer": {"lr": 2e-4}, "scheduler": "cosine", "warmup_ratio": 0.05,
                                                "max_epochs": 2, "batch_size": 16, "gradient_clip_val": 1.0},
                                     "trainer": {"accumulate_grad_batches": 8}}), run_dir / ".hydra" / "config.yaml")
    metrics = {"val/ndcg@10": 0.4321, "test/ndcg@10": 0.4123, "test/hr@1": 0.2, "data/train_examples": 640,
               "data/test_examples": 300}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    data = {"collection": "synthetic", "target": "tools", "sources": [], "max_train_examples": 640, "max_history": 10,
            "num_negatives": 19, "protocol": "ranking"}
    manifest = {**run_record("lora", "tools", data, 0, metrics, str(run_dir), "32-true"),
                "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "scoring": "head"}
    folder = AdapterStore(tmp_path / "store").save("tiny:decoder", "tools", module.model, "default", module.head,
                                                    manifest)
    return module, folder


def test_card_states_what_the_manifest_holds(exported):
    _, folder = exported
    card = (folder / "README.md").read_text()
    manifest = AdapterStore.load_manifest(folder)
    assert card.startswith("---\nbase_model: tiny:decoder\nlibrary_name: peft\n")
    for fact in (f"**method**: {manifest['method']}", f"domain {manifest['domain']}", "collection synthetic",
                 f"r={manifest['r']}, alpha={manifest['alpha']}", f"seed**: {manifest['seed']}", "scoring: head",
                 "lr 0.0002", "epochs 2", "batch_size 16", "accumulate_grad_batches 8", "train_examples 640",
                 "20 candidates", "huggingface-cli upload"):
        assert fact in card, fact
    for key, value in manifest["metrics"].items():
        split, name = key.split("/", 1)
        row = next(ln for ln in card.splitlines() if ln.startswith(f"| {name} |"))
        assert f"{value:.4f}" in row.split("|")[2 if split == "val" else 3], (key, row)


def test_folder_loads_with_plain_peft_and_with_the_card_s_two_lines(exported):
    from peft import PeftConfig, PeftModel

    module, folder = exported
    assert PeftConfig.from_pretrained(str(folder)).base_model_name_or_path == "tiny:decoder"
    plain = PeftModel.from_pretrained(build_tiny("tiny:decoder").model, str(folder))
    ours = {n.replace(".default", ""): p for n, p in module.model.named_parameters() if "lora_" in n}
    theirs = {n.replace(".default", ""): p for n, p in plain.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and ours
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n])
    code = re.search(r"With its scoring head.*?```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(code.replace("<this folder>", str(folder)), scope)  # the card's two lines, as a reader would run them
    loaded = scope["module"]
    for (n, p), (_, q) in zip(loaded.head.named_parameters(), module.head.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_hub_backbones_get_their_hub_name_and_embedded_ones_say_so():
    assert base_model("Qwen/Qwen2-7B-Instruct")[0] == "Qwen/Qwen2-7B-Instruct"
    hub, note = base_model("embedded:minilm-l6")
    assert hub == "sentence-transformers/all-MiniLM-L6-v2" and "embedded" in note
    hub, note = base_model("embedded:smollm2-135m")
    assert hub == "HuggingFaceTB/SmolLM2-135M-Instruct" and "de-quantised" in note
    card = card_text({"backbone": "Qwen/Qwen2-7B-Instruct", "method": "weaverec", "domain": "sports",
                      "data": {"protocol": "paper", "num_negatives": 29}, "metrics": {"test/gen/ndcg@1": 0.1}},
                     repo_id="me/weaverec-sports")
    assert "base_model: Qwen/Qwen2-7B-Instruct" in card and "protocol=paper" in card and "30 candidates" in card
    assert "huggingface-cli upload me/weaverec-sports" in card and "| gen/ndcg@1 |" in card


def test_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """peft keeps target_modules as a set, so its JSON order followed PYTHONHASHSEED; the card writer sorts it."""
    from recsys.models.card import write_card

    texts = []
    for order in (["value", "query"], ["query", "value"]):
        folder = tmp_path / "-".join(order)
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"target_modules": order, "r": 4}))
        write_card(folder, {"backbone": "tiny:encoder", "method": "lora", "domain": "tools"})
        texts.append((folder / "adapter_config.json").read_text())
    assert texts[0] == texts[1] and json.loads(texts[0])["target_modules"] == ["query", "value"]
