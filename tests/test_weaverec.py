"""WeaveRec and its baselines (joint, merge_sources): end-to-end runs on tiny models, the weave step
(each branch's gradient from its own loss only), the hybrid mixture, reuse of stored hybrids in
either order, the exported merge loaded with plain peft, ``evaluate`` reproducing the test metrics,
every merge rule, and clear errors for bad inputs.

Runs go through the real pipeline in-process (``hydra.compose`` + ``recsys.pipeline.run.train``) on tiny
random models, a few batches and 8 evaluation users.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from recsys.data.datamodule import RecDataModule
from recsys.core.errors import UserError
from recsys.methods.lora import LoRAModule
from recsys.methods.weaverec import MERGED, WeaveRecModule, weaverec_name
from recsys.models.adapter_store import AdapterStore, hybrid_name
from recsys.models.backbone import load_backbone
from recsys.models.head import ScoringHead
from recsys.models.merging import MERGE_RULES, lora_delta
from recsys.models.scoring import likelihood_scores, pair_scores
from recsys.pipeline.run import build_datamodule, build_module, evaluate, train
from conftest import compose_config, paths_under

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # steps run without a Trainer
ROWS = ("hr@1", "hr@3", "hr@5", "hr@10", "ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "mrr")
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.precision=32-true", "logger=none",
        "data.max_eval_users=8", "data.batch_size=4", "data.eval_batch_size=8", "zero_shot=false",
        "~callbacks.rich_progress_bar", "data.max_train_examples=64",
        "export_adapter=force"]  # store even a tiny run that stayed at chance (issue 21: not stored by default)
SYNTH = {"tools": {"source": "synthetic", "num_users": 60, "num_items": 80, "seed": 0},
         "toys": {"source": "synthetic", "num_users": 60, "num_items": 80, "seed": 0},
         "sports": {"source": "synthetic", "num_users": 40, "num_items": 70, "seed": 0}}


def config(tmp: Path, *overrides: str, name: str = "train", store: Path | None = None):
    return compose_config(name, *paths_under(tmp, store, tmp / "cache"), *overrides)


def run_train(tmp: Path, *overrides: str, store: Path | None = None) -> dict:
    """train.py in-process; the config goes to ``<tmp>/.hydra/config.yaml`` as train.py's would."""
    cfg = config(tmp, *TINY, *overrides, store=store)
    (tmp / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, tmp / ".hydra" / "config.yaml")
    _, metrics = train(cfg)
    return metrics


def run_evaluate(run_dir: Path, out: Path, store: Path) -> dict:
    _, metrics = evaluate(config(out, f"run_dir={run_dir}", "trainer.precision=32-true", name="eval", store=store))
    return metrics


def weave_args(backbone: str, sources: list[str], *extra: str) -> list[str]:
    return [f"backbone={backbone}", "method=weaverec", "data.target=tools", f"data.sources=[{','.join(sources)}]",
            *extra]


# --------------------------------------------------------------------------------------------- end to end
CASES = {  # id: (backbone, sources, extra overrides)
    "encoder-1": ("tiny_encoder", ["toys"], ["method.module.export_dense=true"]),
    "encoder-2-adamerging": ("tiny_encoder", ["toys", "sports"],
                             ["merge.learn_weights=true", "merge.learn_steps=3", "merge.learn_batches=1"]),
    "decoder-1-likelihood": ("tiny_decoder", ["toys"], ["method.module.scoring=likelihood"]),
    "decoder-2-shared-head": ("tiny_decoder", ["toys", "sports"], ["method.module.head=shared"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One weaverec run a case, each with its own store: {id: (run dir, store, metrics)}."""
    out = {}
    for key, (backbone, sources, extra) in CASES.items():
        tmp = tmp_path_factory.mktemp(key)
        metrics = run_train(tmp / "run", *weave_args(backbone, sources, *extra), store=tmp / "store")
        out[key] = (tmp / "run", tmp / "store", metrics)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_metrics_and_store(runs, key):
    run_dir, store, metrics = runs[key]
    backbone, sources, _ = CASES[key]
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for split in ("val", "test"):
        assert all(f"{split}/{k}" in metrics for k in ROWS)  # the merged model, as lora's keys
    for i in range(len(sources) + 1):
        assert all(f"branch{i}/val/{k}" in metrics for k in ROWS), i
    assert f"branch{len(sources) + 1}/val/ndcg@10" not in metrics
    assert metrics["params/trainable"] > 0 and metrics["params/branches_trained"] == len(sources) + 1
    folder = AdapterStore(store).backbone_dir(f"tiny:{backbone.split('_')[1]}")
    names = {p.name for p in folder.iterdir()}
    assert names == {weaverec_name("tools", sources)} | {hybrid_name("tools", s) for s in sources}
    merged = folder / weaverec_name("tools", sources) / "seed-0"
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["branches"] == ["target"] + [hybrid_name("tools", s) for s in sources]
    assert sorted(p.name for p in (merged / "branches").iterdir()) == sorted(manifest["branches"])
    hybrid = json.loads((folder / hybrid_name("tools", sources[0]) / "seed-0" / "manifest.json").read_text())
    assert hybrid["domains"] == sorted(["tools", sources[0]]) and "val/ndcg@10" in hybrid["metrics"]


def test_checkpoint_holds_every_branch_and_no_merge(runs):
    run_dir, _, _ = runs["encoder-2-adamerging"]
    ckpt = torch.load(next((run_dir / "checkpoints").glob("epoch*.ckpt")), weights_only=False)
    keys = list(ckpt["state_dict"])
    for adapter in ["target", hybrid_name("tools", "toys"), hybrid_name("sports", "tools")]:
        assert any(f".lora_A.{adapter}." in k for k in keys), adapter
    assert not any(f".{MERGED}." in k for k in keys)
    assert not any(".lora_" not in k and not k.startswith("heads.") for k in keys)  # no backbone weight
    learned = ckpt["weaverec"]["learned_weights"]  # AdaMerging's lambdas, one list per adapted module
    assert learned and all(len(v) == 3 for v in learned.values())


@pytest.mark.parametrize("key", list(CASES))
def test_evaluate_run_dir_reproduces_test_metrics(runs, key, tmp_path):
    run_dir, store, metrics = runs[key]
    again = run_evaluate(run_dir, tmp_path / "eval", store)
    for k in ROWS:
        assert again[f"test/{k}"] == pytest.approx(metrics[f"test/{k}"], abs=1e-6), k


def _run_module(run_dir: Path, store: Path):
    """The run's module at its best checkpoint (as evaluate.py builds it), its config and a test batch."""
    from recsys.pipeline.run import build_backbone

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    backbone = build_backbone(cfg)
    dm = build_datamodule(cfg, backbone)
    module = build_module(cfg, backbone, dm, AdapterStore(store))
    ckpt = torch.load(next((run_dir / "checkpoints").glob("epoch*.ckpt")), weights_only=False)
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    dm.setup("test")
    module.eval()
    return module, cfg, next(iter(dm.test_dataloader()))


@pytest.mark.parametrize("key", ["encoder-1", "decoder-1-likelihood", "decoder-2-shared-head"])
def test_exported_merge_loads_in_plain_peft_and_scores_the_same(runs, key):
    run_dir, store, _ = runs[key]
    module, cfg, batch = _run_module(run_dir, store)
    with torch.no_grad():
        expected = module.score(batch)
    folder = AdapterStore(store).path(cfg.backbone.name, weaverec_name("tools", list(cfg.data.sources)))
    fresh = load_backbone(cfg.backbone.name)
    plain = PeftModel.from_pretrained(fresh.model, str(folder)).eval()
    with torch.no_grad():
        if module.scoring == "likelihood":
            got = likelihood_scores(plain, batch)
        else:
            head = ScoringHead(fresh.hidden_size)
            head.load_state_dict(load_file(str(folder / "head.safetensors")))
            got = pair_scores(plain, head.eval(), batch, fresh.kind)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the merged adapter is the sum of lambda-scaled branch products, module by module
    lam = 1.0 / len(module.branches)
    deltas = [lora_delta(module.model, b.adapter) for b in module.branches]
    for name, d in lora_delta(module.model, MERGED).items():
        torch.testing.assert_close(d, sum(lam * x[name] for x in deltas), rtol=1e-4, atol=1e-6)
    if (folder / "dense").is_dir():  # the dense export: the update folded into the weights
        from transformers import AutoModel

        dense = AutoModel.from_pretrained(str(folder / "dense")).eval()
        with torch.no_grad():
            torch.testing.assert_close(pair_scores(dense, head.eval(), batch, fresh.kind), expected,
                                       rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- weave step
def _datamodule(sources, **kw) -> RecDataModule:
    return RecDataModule.from_config(domains=SYNTH, target="tools", sources=sources, mix="hybrid", max_eval_users=4,
                                     batch_size=4, eval_batch_size=4, **kw)


def _module(kind="encoder", sources=("toys", "sports"), **kw):
    backbone = load_backbone(f"tiny:{kind}")
    torch.manual_seed(0)
    module = WeaveRecModule(backbone, "tools", list(sources), dropout=0.0, **kw)
    with torch.no_grad():  # peft starts B at 0: make every branch a different, non-zero update
        for n, p in module.model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2)
    dm = _datamodule(list(sources))
    dm.attach(backbone.tokenizer, backbone.kind, likelihood=kw.get("scoring") == "likelihood")
    dm.setup("fit")
    batch = {k: next(iter(v)) for k, v in dm.train_loaders().items()}
    return module, batch


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["per_branch", "shared"])
def test_weave_step_gives_each_branch_its_own_gradient(head):
    module, batch = _module(head=head)
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    module.training_step(batch, 0).backward()
    woven = _grads(module)
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags  # switching changed no flag
    separate = {}
    for i, b in enumerate(module.branches):  # each branch alone, on its own stream
        module.zero_grad()
        sub = batch[b.stream]
        module.loss(module.branch_score(sub, i), sub["labels"]).backward()
        got = _grads(module)
        for n, g in got.items():
            if ".lora_" in n:  # only this branch's adapter gets a gradient
                assert f".{b.adapter}." in n, (b.adapter, n)
            separate[n] = separate.get(n, 0) + g
    assert set(woven) == set(separate)
    for n in woven:
        torch.testing.assert_close(woven[n], separate[n], rtol=1e-5, atol=1e-7)
    for a in module.adapters:
        assert any(f".{a}." in n for n in woven), a  # every branch trained in the one step


def test_weave_clipping_is_per_branch():
    module, batch = _module(head="per_branch")
    module.training_step(batch, 0).backward()
    module.configure_gradient_clipping(None, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    for b, h in zip(module.branches, module.heads):
        params = module.weave.params[b.adapter] + list(h.parameters())
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        assert norm == pytest.approx(1e-3, rel=1e-3)


def test_merged_head_is_the_mean_of_branch_heads():
    module, batch = _module(head="per_branch", merge={"weights": [0.5, 0.25, 0.25]})
    with torch.no_grad():
        for i, h in enumerate(module.heads):
            for p in h.parameters():
                p.fill_(float(i))
    module.ensure_merged()
    for p in module.merged_head.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.5 * 0 + 0.25 * 1 + 0.25 * 2))


# --------------------------------------------------------------------------------------------- hybrid data
def test_hybrid_mixture_proportions_cap_and_skipped_streams():
    dm = _datamodule(["toys", "sports"], hybrid_cap=30)
    dm.setup("fit")
    assert set(dm.train_entries) == {"target", "hybrid/toys", "hybrid/sports"}
    for s in ("toys", "sports"):
        assert Counter(d for d, _ in dm.train_entries[f"hybrid/{s}"]) == {"tools": 30, s: 30}
    full = _datamodule(["toys"], hybrid_cap=10**6)
    full.setup("fit")
    n_t = len(full.train_entries["target"])
    n_s = len(full.domain_train("toys"))
    assert Counter(d for d, _ in full.train_entries["hybrid/toys"]) == {"tools": n_t, "toys": n_s}  # released: min(cap, |S|)
    skip = _datamodule(["toys", "sports"], hybrid_cap=30)
    skip.skip_streams = {"hybrid/toys"}
    skip.setup("fit")
    assert set(skip.train_entries) == {"target", "hybrid/sports"}


def record_with(monkeypatch, recorder: L.Callback) -> L.Callback:
    """``recorder`` added to the trainer that train.py builds (``recsys.pipeline.run.build_trainer``)."""
    from recsys.pipeline import run as pipeline

    build = pipeline.build_trainer

    def with_recorder(cfg, **kw):
        trainer = build(cfg, **kw)
        trainer.callbacks.append(recorder)
        return trainer

    monkeypatch.setattr(pipeline, "build_trainer", with_recorder)
    return recorder


class OptimizerSteps(L.Callback):
    """At the end of training: the optimizer's step count (AdamW's per-weight ``step``) of each branch's weights."""

    def __init__(self):
        self.steps: dict[int, set[int]] = {}

    def on_train_end(self, trainer, module):
        state = trainer.optimizers[0].state
        for i, b in enumerate(module.branches):
            if b.trained:
                self.steps[i] = {int(state[w]["step"]) for w in module.weave.weights(i, module.own_heads)}


def test_each_branch_sees_its_examples_once_an_epoch(tmp_path, monkeypatch):
    """The hybrid stream (16 target + 16 source examples) is twice the target's (16): in one epoch the
    target branch takes 4 steps of 4 and the hybrid 8, none repeated (max_size, not max_size_cycle). The
    optimizer updates the target branch's weights (adapter and head) in its 4 steps only: the zero gradients
    it gets once its stream is exhausted (for DDP, WeaveRecModule.training_step) are dropped, not stepped on."""
    recorder = record_with(monkeypatch, OptimizerSteps())
    m = run_train(tmp_path, *weave_args("tiny_encoder", ["toys"]), "data.max_train_examples=16",
                  "trainer.limit_train_batches=null", "method.module.validate_branches=false")
    assert (m["branch0/train/steps"], m["branch1/train/steps"]) == (4.0, 8.0)
    assert recorder.steps == {0: {4}, 1: {8}}


@pytest.mark.slow
def test_unequal_streams_train_under_ddp_without_unused_parameter_search(tmp_path):
    """``trainer=ddp`` on 2 CPU processes with DDP's default ``find_unused_parameters=false``: the target
    branch's stream ends half-way through the epoch and the run still trains (Lightning used to stop it: "your
    LightningModule has parameters that were not used in producing the loss"), each branch taking the steps it
    takes in one process."""
    from test_lora import run as run_script

    args = [*weave_args("tiny_encoder", ["toys"]), "data.max_train_examples=16", "trainer.limit_train_batches=null",
            "method.module.validate_branches=false",
            *[a for a in TINY if not a.startswith(("trainer.limit_train_batches", "data.max_train_examples"))],
            f"paths.cache_dir={tmp_path}/cache"]
    steps = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])):
        run_script("train.py", *args, *extra, f"hydra.run.dir={tmp_path / name}",
                   f"paths.adapter_store={tmp_path / name}-store", timeout=900)  # its own store: no hybrid reused
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        steps[name] = (m["branch0/train/steps"], m["branch1/train/steps"])
    assert steps["one"] == steps["two"] == (4.0, 8.0)  # batch 4 is global: 2 a rank, as many steps as one process


class BranchLr(L.Callback):
    """Each branch's learning rate at each step it takes: the lr of the param group holding its first LoRA weight."""

    def __init__(self):
        self.lrs: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        opt = trainer.optimizers[0]
        for i, b in enumerate(module.branches):
            if b.trained and batch.get(b.stream) is not None:
                first = module.weave.params[b.adapter][0]
                lr = next(g["lr"] for g in opt.param_groups if any(p is first for p in g["params"]))
                self.lrs.setdefault(i, []).append(lr)


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_each_branch_warms_up_and_decays_over_its_own_steps(tmp_path, monkeypatch, scheduler):
    """Unequal streams (target 4 batches an epoch, hybrid 8), 2 epochs: each branch's lr over the steps it
    takes is the schedule of a run of its own length (warm-up 25% of ITS steps, the cosine's end at ITS last
    step), as the release trains each LoRA on its own schedule, not one schedule over the longest stream."""
    from recsys.methods.base import warmup_cosine

    recorder = record_with(monkeypatch, BranchLr())
    m = run_train(tmp_path, *weave_args("tiny_encoder", ["toys"]), "data.max_train_examples=16",
                  "trainer.limit_train_batches=null", "trainer.max_epochs=2", "method.module.validate_branches=false",
                  "recipe.warmup_ratio=0.25", f"recipe.scheduler={scheduler}", "recipe.optimizer.lr=0.01")
    assert (m["branch0/train/steps"], m["branch1/train/steps"]) == (8.0, 16.0)
    for i, n in ((0, 8), (1, 16)):
        f = warmup_cosine(n, 0.25, 1.0 if scheduler == "constant" else 0.0)
        assert recorder.lrs[i] == pytest.approx([0.01 * f(k) for k in range(n)]), i
    warm = [sum(1 for a, b in zip(lrs, lrs[1:]) if b > a) + 1 for lrs in recorder.lrs.values()]
    assert warm == [2, 4]  # its own warm-up: 25% of 8 and of 16 steps
    if scheduler == "cosine":  # each ends at the cosine's tail, not the target half-way down the hybrid's
        assert recorder.lrs[0][-1] == pytest.approx(0.01 * warmup_cosine(8, 0.25)(7)) and recorder.lrs[0][-1] < 0.0011


# --------------------------------------------------------------------------------------------- reuse
def test_store_reuses_a_hybrid_in_either_order(runs, tmp_path, caplog):
    _, store, _ = runs["encoder-1"]
    store = Path(shutil.copytree(store, tmp_path / "store"))
    stored = load_file(str(AdapterStore(store).path("tiny:encoder", hybrid_name("tools", "toys"))
                           / "adapter_model.safetensors"))
    # the hybrid of (tools, toys) trained with target tools serves target toys with source tools
    cfg = config(tmp_path / "run", *TINY, "backbone=tiny_encoder", "method=weaverec", "data.target=toys",
                 "data.sources=[tools]", store=store)
    from recsys.pipeline.run import build_backbone

    backbone = build_backbone(cfg)
    dm = build_datamodule(cfg, backbone)
    module = build_module(cfg, backbone, dm, AdapterStore(store))
    assert [b.trained for b in module.branches] == [True, False]
    assert module.branches[1].adapter == hybrid_name("toys", "tools") == hybrid_name("tools", "toys")
    assert dm.skip_streams == {"hybrid/tools"}
    a = module.branches[1].adapter
    state = {k.replace(f".{a}.", "."): v for k, v in module.model.state_dict().items() if f".{a}." in k}
    assert set(state) == set(stored) and all(torch.equal(state[k], stored[k]) for k in stored)
    assert not any(p.requires_grad for p in module.weave.params[module.branches[1].adapter])
    # a full run with the reused hybrid trains only the target branch
    metrics = run_train(tmp_path / "run2", "backbone=tiny_encoder", "method=weaverec", "data.target=toys",
                        "data.sources=[tools]", store=store)
    assert metrics["params/branches_trained"] == 1 and "branch1/val/ndcg@10" in metrics
    # retrain on request, and when the stored one does not fit (another rank)
    for extra in (["method.module.retrain_hybrids=true"], ["method.module.r=4"]):
        cfg = config(tmp_path / "run3", *TINY, "backbone=tiny_encoder", "method=weaverec", "data.target=toys",
                     "data.sources=[tools]", *extra, store=store)
        backbone = build_backbone(cfg)
        with caplog.at_level(logging.WARNING, logger="recsys.weaverec"):
            module = build_module(cfg, backbone, build_datamodule(cfg, backbone), AdapterStore(store))
        assert [b.trained for b in module.branches] == [True, True], extra
    assert "r 8 != 4" in caplog.text


# --------------------------------------------------------------------------------------------- baselines
@pytest.fixture(scope="module")
def lora_store(tmp_path_factory):
    """A store with random LoRA adapters (+ heads) of tools, toys and sports on the tiny encoder."""
    tmp = tmp_path_factory.mktemp("lora_store")
    store = AdapterStore(tmp / "store")
    for i, d in enumerate(["tools", "toys", "sports"]):
        module = LoRAModule(load_backbone("tiny:encoder"))
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for n, p in module.model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        module.export(store, {"domain": d, "method": "lora"})
    return tmp / "store"


@pytest.mark.parametrize("rule", MERGE_RULES)
def test_merge_sources_each_rule(lora_store, rule, tmp_path):
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=merge_sources",
                        "data.sources=[toys,sports]", f"merge.rule={rule}", store=lora_store)
    assert all(f"test/{k}" in metrics and f"val/{k}" in metrics for k in ROWS)
    assert metrics["params/trainable"] == 0 and metrics["time/train_s"] < 1


@pytest.mark.parametrize("rule", ["task_arithmetic", pytest.param("ties", marks=pytest.mark.slow)])
def test_merge_scale_is_the_validation_argmax(lora_store, tmp_path, monkeypatch, rule):
    """merge.scaling_grid (x density_grid for ties): the merge tested is the grid's best on validation (the
    first on ties), reported as merge/scale and merge/density; each pair's score equals the val/ndcg@10 of a
    run at that fixed setting; no test batch is read before the choice is made."""
    from recsys.data.datamodule import RecDataModule as DM
    from recsys.methods.merge_sources import MergeSourcesModule

    events, real_test, real_choose = [], DM.test_dataloader, MergeSourcesModule.choose
    monkeypatch.setattr(DM, "test_dataloader", lambda self: events.append("test") or real_test(self))
    monkeypatch.setattr(MergeSourcesModule, "choose", lambda self, b: events.append("choose") or real_choose(self, b))
    grid = ["merge.scaling_grid=[0.2,1.0,3.0]", "merge.density_grid=" + ("[0.3,0.9]" if rule == "ties" else "null")]
    args = ["backbone=tiny_encoder", "method=merge_sources", "data.sources=[toys,sports]", f"merge.rule={rule}",
            "data.max_eval_users=24"]
    tuned = run_train(tmp_path / "tuned", *args, *grid, store=lora_store)
    assert events[0] == "choose" and events.count("choose") == 1 and "test" in events
    pairs = [(c, d) for c in (0.2, 1.0, 3.0) for d in ((0.3, 0.9) if rule == "ties" else (0.5,))]
    scores = {}
    for c, d in pairs:
        fixed = run_train(tmp_path / f"fixed-{c}-{d}", *args, f"merge.scaling={c}", f"merge.density={d}",
                          "merge.scaling_grid=null", "merge.density_grid=null", store=lora_store)
        scores[(c, d)] = fixed["val/ndcg@10"]
        assert tuned[f"merge/grid/{c:g},{d:g}"] == pytest.approx(scores[(c, d)], abs=1e-6)
    best = max(pairs, key=lambda p: (scores[p], -pairs.index(p)))
    assert (tuned["merge/scale"], tuned["merge/density"]) == best
    assert f"scaling {best[0]:g}, density {best[1]:g}" in (tmp_path / "tuned" / "results.txt").read_text()
    assert tuned["val/ndcg@10"] == pytest.approx(scores[best], abs=1e-6)
    assert len(set(scores.values())) > 1  # the grid matters on this data


def test_a_merge_run_is_tested_once(lora_store, tmp_path, monkeypatch):
    """Nothing trains in a merge run, so its zero-shot row is the tested model itself: the test set is read
    once (not a second full test of the same merge), and the zero-shot metrics and per-user ranks are the
    test's."""
    from recsys.data.datamodule import RecDataModule as DM
    from recsys.evaluation import ranks

    tests, real_test = [], DM.test_dataloader
    monkeypatch.setattr(DM, "test_dataloader", lambda self: tests.append(1) or real_test(self))
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=merge_sources", "data.sources=[toys]",
                        "merge.rule=task_arithmetic", "merge.scaling_grid=null", "zero_shot=true", store=lora_store)
    assert len(tests) == 1
    assert all(metrics[f"zero_shot/test/{k}"] == metrics[f"test/{k}"] for k in ROWS)
    rows = ranks.read(tmp_path / "run" / ranks.FILE)
    test, zero = (rows[rows["split"] == s].drop(columns="split").reset_index(drop=True) for s in ("test", "zero_shot/test"))
    assert len(test) > 0 and test.equals(zero)


def test_merge_grid_is_scored_at_validations_precision(lora_store, tmp_path, monkeypatch):
    """Under trainer.precision=bf16-mixed every grid score is computed under the bf16 autocast that validation
    and test run under (not in float32, 2-3x slower on the CPU and a different number), so the chosen pair's
    grid score is the run's val/ndcg@10."""
    from recsys.methods.merge_sources import MergeSourcesModule

    modes, real_score = {}, MergeSourcesModule.score

    def score(self, batch):
        stage = "choose" if self.chosen is None else "eval"
        modes.setdefault(stage, set()).add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_score(self, batch)

    monkeypatch.setattr(MergeSourcesModule, "score", score)
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=merge_sources", "data.sources=[toys]",
                        "merge.rule=task_arithmetic", "merge.scaling_grid=[0.5,2.0]", "trainer.precision=bf16-mixed",
                        store=lora_store)
    assert modes["choose"] == modes["eval"] == {(True, torch.bfloat16)}
    chosen = f"merge/grid/{metrics['merge/scale']:g},{metrics['merge/density']:g}"
    assert metrics[chosen] == pytest.approx(metrics["val/ndcg@10"], abs=1e-6)


def test_merge_grid_of_each_rule():
    from recsys.models.merging import MergeSettings

    grids = {"scaling_grid": [0.1, 0.5], "density_grid": [0.2, 0.8]}
    assert [(g.scaling, g.density) for g in MergeSettings.of({"rule": "weaverec", **grids}).grid()] == [(1.0, 0.5)]
    assert [g.scaling for g in MergeSettings.of({"rule": "task_arithmetic", **grids}).grid()] == [0.1, 0.5]
    assert len(MergeSettings.of({"rule": "dare_ties", **grids}).grid()) == 4
    with pytest.raises(UserError, match="merge.density_grid"):
        MergeSettings.of({"density_grid": [1.5]})


def test_merge_sources_evaluate_reproduces(lora_store, tmp_path):
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=merge_sources",
                        "data.sources=[toys]", "merge.rule=dare_ties", store=lora_store)
    again = run_evaluate(tmp_path / "run", tmp_path / "eval", lora_store)  # no checkpoint: rebuilt from the store
    for k in ROWS:
        assert again[f"test/{k}"] == pytest.approx(metrics[f"test/{k}"], abs=1e-6), k


def test_joint_trains_one_lora_on_pooled_data(tmp_path):
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=joint", "data.sources=[toys]")
    assert all(f"test/{k}" in metrics for k in ROWS)
    assert metrics["data/train_examples"] == 128  # 64 a domain (data.max_train_examples), pooled
    names = {p.name for p in (tmp_path / "run" / "store" / "tiny-encoder").iterdir()}
    assert names == {"joint-tools-with-toys"}  # never the target's own LoRA slot


@pytest.mark.parametrize("steps", ["epochs", "equal"])
def test_joint_at_equal_steps_takes_target_only_steps(tmp_path, monkeypatch, steps):
    """method.module.steps=equal: 16 target + 16 source examples pooled, batch 4, 2 epochs: 4 steps an epoch
    (target-only's 16 / 4), not the pool's 8; the schedule spans those 8 steps (the lr's last value is the
    cosine's end) and validation still runs each epoch; stored apart from the epochs-joint adapter."""
    from recsys.methods.base import warmup_cosine

    lrs = []

    class Lr(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_validation_epoch_end(self, trainer, module):
            lrs.append("val")

    record_with(monkeypatch, Lr())
    metrics = run_train(tmp_path / "run", "backbone=tiny_encoder", "method=joint", "data.sources=[toys]",
                        f"method.module.steps={steps}", "data.max_train_examples=16", "trainer.limit_train_batches=null",
                        "trainer.max_epochs=2", "recipe.optimizer.lr=0.01")
    n = 4 if steps == "equal" else 8
    assert metrics["data/train_examples"] == 32 and metrics["train/steps"] == 2 * n
    assert lrs == [*(0.01 * warmup_cosine(2 * n, 0.1)(k) for k in range(n)), "val",
                   *(0.01 * warmup_cosine(2 * n, 0.1)(k) for k in range(n, 2 * n)), "val"]
    name = "joint-tools-with-toys" + ("-equal-steps" if steps == "equal" else "")
    assert {p.name for p in (tmp_path / "run" / "store" / "tiny-encoder").iterdir()} == {name}


# --------------------------------------------------------------------------------------------- errors
def _merge_sources(store, tmp, *extra):
    cfg = config(tmp, *TINY, "backbone=tiny_encoder", "method=merge_sources", "data.sources=[toys]", *extra,
                 store=store)
    from recsys.pipeline.run import build_backbone

    backbone = build_backbone(cfg)
    return build_module(cfg, backbone, build_datamodule(cfg, backbone), AdapterStore(store))


def test_missing_adapters_name_each_and_the_command(tmp_path):
    with pytest.raises(UserError) as e:
        _merge_sources(tmp_path / "empty", tmp_path)
    text = str(e.value)
    for d in ("tools", "toys"):
        assert f"python train.py method=lora data.target={d}" in text
    assert "train_missing" in text


def test_bad_merge_inputs_fail_clearly(lora_store, tmp_path):
    with pytest.raises(ValueError, match="merge.rule='nope' is unknown"):
        _merge_sources(lora_store, tmp_path, "merge.rule=nope")
    with pytest.raises(ValueError, match="merge.weights has 3 values .* 2 adapters are merged"):
        _merge_sources(lora_store, tmp_path, "merge.weights=[0.2,0.3,0.5]")
    with pytest.raises(ValueError, match="merge.weights has 1 values .* 3 adapters"):
        WeaveRecModule(load_backbone("tiny:encoder"), "tools", ["toys", "sports"], merge={"weights": [1.0]})
    with pytest.raises(ValueError, match="merge.rule='nope' is unknown"):
        WeaveRecModule(load_backbone("tiny:encoder"), "tools", ["toys"], merge={"rule": "nope"})


def _replace_adapter(store: Path, domain: str, backbone_kw: dict, lora_kw: dict, backbone_name=None):
    module = LoRAModule(load_backbone("tiny:encoder", **backbone_kw), **lora_kw)
    module.export(AdapterStore(store), {"domain": domain})
    if backbone_name:  # as if trained on another backbone
        f = AdapterStore(store).path("tiny:encoder", domain) / "manifest.json"
        m = json.loads(f.read_text())
        f.write_text(json.dumps({**m, "backbone": backbone_name}))


def test_adapters_of_other_backbones_or_modules_fail_clearly(lora_store, tmp_path):
    cases = [
        ({}, {"target_modules": ["query", "key"]}, None, "different target modules"),
        ({"hidden_size": 48}, {}, None, "different shapes|different backbone"),
        ({}, {}, "tiny:decoder", "trained on backbone 'tiny:decoder'"),
    ]
    for i, (backbone_kw, lora_kw, name, message) in enumerate(cases):
        store = Path(shutil.copytree(lora_store, tmp_path / f"store{i}"))
        _replace_adapter(store, "toys", backbone_kw, lora_kw, name)
        with pytest.raises(ValueError, match=message):
            _merge_sources(store, tmp_path)


def test_weaverec_needs_hybrid_data_and_sources(tmp_path):
    with pytest.raises(Exception, match="data.mix=hybrid needs data.sources"):
        run_train(tmp_path / "run", "backbone=tiny_encoder", "method=weaverec", "data.sources=[]")
    with pytest.raises(ValueError, match="head='both' is unknown"):
        WeaveRecModule(load_backbone("tiny:encoder"), "tools", ["toys"], head="both")


def test_heads_start_from_the_same_weights_whatever_the_branches():
    """A hybrid reused from another run was trained from the same initial head as this run's
    branches: the initial head does not depend on how many adapters were created before it."""
    one, _ = _module(sources=("toys",))
    torch.manual_seed(123)  # another random state, more branches
    two, _ = _module(sources=("toys", "sports"))
    for h in list(one.heads) + list(two.heads):
        for a, b in zip(h.state_dict().values(), one.heads[0].state_dict().values()):
            torch.testing.assert_close(a, b)
