"""SASRec (the ID baseline), per-user ranks, full-catalogue evaluation and two-stage candidates, end to
end on a tiny synthetic domain in seconds: no language model is loaded."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from recsys.evaluation import ranks
from recsys.pipeline import run
from recsys.data.datamodule import RecDataModule
from recsys.data.domain import DataError
from recsys.data.ids import IdCollator
from recsys.data.retrieval import RetrievedNegatives
from recsys.core.metrics import eval_ranks
from recsys.methods.sasrec import SASRecModule
from conftest import compose_config, paths_under

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`", "ignore:The ``compute`` method")
REPO = Path(__file__).resolve().parents[1]
K = 5
TINY = ["method=sasrec", "logger=none", "~callbacks.rich_progress_bar", "trainer.precision=32-true",
        "recipe.max_epochs=2", "recipe.batch_size=32", "data.max_eval_users=null", "data.max_train_examples=null",
        "data.domains.tools.num_users=60", "data.domains.tools.num_items=40", f"eval.retrieve_k={K}",
        "method.module.hidden=16", "data.max_history=8"]


def config(out: Path, *overrides: str):
    return compose_config("train", *paths_under(out, out.parent / "store", out.parent / "cache"), *TINY, *overrides)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """A tiny SASRec run (the retriever); loading a backbone fails the test."""
    out = tmp_path_factory.mktemp("sasrec") / "run"
    cfg = config(out)
    real = run.build_backbone
    run.build_backbone = lambda cfg: (_ for _ in ()).throw(AssertionError("SASRec loaded a backbone"))
    try:
        _, metrics = run.train(cfg)
    finally:
        run.build_backbone = real
    return out, cfg, metrics


def test_ids_batches_are_left_padded():
    b = IdCollator(3)([("d", (4, 5, 6, 7), [1, 2], 1), ("d", (9,), [3, 4], 0)])
    assert b["history"].tolist() == [[6, 7, 8], [0, 0, 10]]  # item + 1, the most recent last, 0 pads
    assert b["candidates"].tolist() == [[1, 2], [3, 4]] and b["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("train_on", ["last", "sequence"])
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_both_losses_train(loss, train_on):
    torch.manual_seed(0)
    m = SASRecModule(num_items=30, max_len=5, hidden=8, loss=loss, train_on=train_on)
    batch = IdCollator(5)([("d", (1, 2, 3), [4, 5, 6], 0), ("d", (7,), [8, 9, 10], 2)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss_value = m.objective(batch)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        first = first if first is not None else float(loss_value.detach())
    assert float(loss_value) < first
    assert m.score(batch).shape == (2, 3) and m.score_all(batch["history"]).shape == (2, 30)


def test_sasrec_run_writes_metrics_ranks_and_retrieved(retriever):
    out, cfg, metrics = retriever
    for key in ("test/ndcg@10", "val/ndcg@10", "test/full/ndcg@10", "test/full/mrr", f"test/full/recall@{K}",
                "popularity/test/full/hr@10", "random/test/full/hr@10", "popularity/test/ndcg@10"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["params/trainable"] > 0
    # the epochs run (recipe.max_epochs=2, no early stop that soon) and the one selected (from 0)
    assert metrics["train/epochs"] == 2 and metrics["train/best_epoch"] in (0, 1)
    df = ranks.read(out)
    assert list(df.columns) == list(ranks.COLUMNS)
    assert sorted(df["split"].unique()) == ["popularity/test", "popularity/test/full", "random/test",
                                            "random/test/full", "test", "test/full", "val", "val/full"]
    assert ranks.ndcg(df[df["split"] == "popularity/test/full"]["rank"]).mean() == pytest.approx(
        metrics["popularity/test/full/ndcg@10"], abs=1e-6)
    for ref in ("popularity", "random"):  # the reference rows' per-user ranks reproduce their metrics
        rows = df[df["split"] == f"{ref}/test"]
        assert ranks.ndcg(rows["rank"]).mean() == pytest.approx(metrics[f"{ref}/test/ndcg@10"], abs=1e-6)
    s = ranks.summary(df).set_index("split")
    assert s.loc["test", "ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    assert s.loc["test", "mrr"] == pytest.approx(metrics["test/mrr"], abs=1e-6) and s.loc["test", "users"] == 60
    test = df[df["split"] == "test"]
    assert len(test) == 60 and (test["n_candidates"] == 20).all() and test["rank"].between(1, 20).all()
    assert test["user"].is_unique
    # the file reproduces metrics.json: mean per-user NDCG@10 and HR@1
    assert ranks.ndcg(test["rank"]).mean() == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    assert (test["rank"] == 1).mean() == pytest.approx(metrics["test/hr@1"], abs=1e-6)
    full = df[df["split"] == "test/full"]
    assert ranks.ndcg(full["rank"]).mean() == pytest.approx(metrics["test/full/ndcg@10"], abs=1e-6)
    with np.load(out / "retrieved.npz") as z:
        assert z["test/items"].shape == (60, K) and str(z["domain"]) == "tools"


def test_two_stage_candidates_from_the_retriever(retriever):
    """Retrieved candidates: a target the retriever missed scores 0 at every k; a present one is ranked
    among the K, and SASRec re-ranking its own top K gives its full-catalogue rank."""
    out, cfg, metrics = retriever
    cfg.data.candidates, cfg.data.retriever = "retrieved", str(out)
    dm = run.build_datamodule(cfg)
    dm.load_domains()
    assert not SASRecModule.needs_backbone
    run.attach_backbone(cfg, dm, None)
    dm.setup("test")
    ds = dm.eval_sets["test"]
    assert ds.candidates.shape == (60, K)
    missed, found = ds.target < 0, ds.target >= 0
    assert missed.any() and found.any()
    assert dm.reference_metrics("test")["retrieval"][f"recall@{K}"] == pytest.approx(metrics[f"test/full/recall@{K}"])
    module = run.build_module(cfg, None, dm, None)
    best = run.best_checkpoint(out)
    module.load_state_dict(torch.load(best, weights_only=True)["state_dict"], strict=False)
    module.eval()
    batch = IdCollator(dm.max_history)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        r = eval_ranks(module.score(batch), batch["labels"]).numpy()
    assert np.isinf(r[missed]).all() and (r[found] < K).all()
    full = ranks.read(out)
    full = full[full["split"] == "test/full"].set_index("user")["rank"]
    users = [dm.domains["tools"].user_ids[e.user] for e in ds.examples]
    assert [int(full[u]) for u, f in zip(users, found) if f] == (r[found] + 1).astype(int).tolist()
    # the metrics of a run on these candidates: a miss is 0 everywhere
    from recsys.core.metrics import RankingMetrics

    m = RankingMetrics()
    m.update(module.score(batch).detach(), batch["labels"])
    assert float(m.compute()["hr@10"]) == pytest.approx(found.mean())


def test_retrieved_needs_a_retriever(tmp_path):
    synth = {"tools": {"source": "synthetic", "num_users": 20, "num_items": 30}}
    with pytest.raises(DataError, match="data.retriever"):
        RecDataModule.from_config(domains=synth, target="tools", candidates="retrieved")
    dm = RecDataModule.from_config(domains=synth, target="tools", candidates="retrieved", retriever=str(tmp_path))
    with pytest.raises(DataError, match="no retrieved.npz"):
        dm.setup()


def test_catalogue_excludes_only_the_history():
    """A val target is ranked against the later items too (the test target is not known yet); a test target
    against everything but its history; an earlier purchase of the target itself is never excluded."""
    from recsys.evaluation.catalogue import rank_catalogue
    from recsys.data.domain import Domain

    dom = Domain("d", [f"i{n}" for n in range(6)], [f"t{n}" for n in range(6)], ["u0", "u1"],
                 [[0, 1, 2, 3], [4, 5, 4]])
    score = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # item 3 (u0's test target) scores highest

    def fn(hist, rows):
        return score.expand(hist.size(0), -1)

    val, test = dom.examples("val", 5), dom.examples("test", 5)
    r_val, top = rank_catalogue(fn, dom, val, 5, k=3, split="val")
    r_test, _ = rank_catalogue(fn, dom, test, 5, split="test")
    # u0: val target 2 behind items 5, 4, 3 (3 is u0's later test item: kept); u1: val target 5, first
    assert r_val.tolist() == [3.0, 0.0]
    assert top[0].tolist() == [5, 4, 3]
    # u0: test target 3 behind 5, 4 (0, 1, 2 are history); u1: test target 4 (bought before too) behind nothing
    assert r_test.tolist() == [2.0, 0.0]


def test_hard_negatives_from_the_retriever(retriever, tmp_path):
    """data.train_negatives=retrieved: the training negatives of a target example come from the retriever's
    val top K of that user, deterministically; an old retrieved.npz or a missing retriever is a clear error."""
    out, cfg, metrics = retriever
    cfg.data.train_negatives, cfg.data.retriever = "retrieved", str(out)
    dm = run.build_datamodule(cfg)
    dm.load_domains()
    run.attach_backbone(cfg, dm, None)
    dm.setup("fit")
    dom = dm.domains["tools"]
    with np.load(out / "retrieved.npz") as z:
        assert str(z["excludes"]) == "history"
        top = {u: set(items.tolist()) for u, items in zip(z["val/users"].tolist(), z["val/items"])}
    index = {iid: i for i, iid in enumerate(dom.item_ids)}
    ds = dm.train_loaders()["train"].dataset
    assert len(ds) > 50
    for idx in range(len(ds)):
        _, ex = ds.entries[idx]
        _, _, cands, pos = ds[(idx, 0)]
        negatives = [c for j, c in enumerate(cands) if j != pos]
        pool = {index[i] for i in top[dom.user_ids[ex.user]]} - {ex.target}
        assert len(negatives) == dm.candidate_settings.num_train_negatives == 4 and cands[pos] == ex.target
        assert set(negatives) <= pool or set(pool) <= set(negatives), (negatives, pool)  # K = 5: four from the pool
        assert ds[(idx, 0)][2] == cands  # the same draw again
    # an old file (ranked with the whole sequence excluded) is refused for hard negatives
    old = tmp_path / "old"
    old.mkdir()
    with np.load(out / "retrieved.npz") as z:
        np.savez(old / "retrieved.npz", **{k: z[k] for k in z.files if k != "excludes"})
    with pytest.raises(DataError, match="store it again"):
        RetrievedNegatives(dom, old)
    with pytest.raises(DataError, match="train_negatives=retrieved needs data.retriever"):
        RecDataModule.from_config(domains={"tools": {"source": "synthetic"}}, target="tools", train_negatives="retrieved")


def test_evaluate_full_catalogue(retriever, tmp_path):
    """evaluate.py eval.candidates=full on a run folder: the full-catalogue metrics of the split, as training
    measured them, and the split's top K stored for a two-stage run."""
    out, _, metrics = retriever
    (out / ".hydra").mkdir(exist_ok=True)  # what Hydra writes for a train.py run
    OmegaConf.save(config(out), out / ".hydra" / "config.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        ecfg = compose("eval", overrides=[f"run_dir={out}", f"paths.output_dir={tmp_path}", "method=sasrec",
                                          "split=val", "eval.candidates=full", "trainer.precision=32-true",
                                          f"paths.cache_dir={out.parent / 'cache'}"])
    _, m = run.evaluate(ecfg)
    assert m["val/full/ndcg@10"] == pytest.approx(metrics["val/full/ndcg@10"], abs=1e-6)
    with np.load(tmp_path / "retrieved.npz") as z:
        assert z["val/items"].shape == (60, K) and "test/items" not in z.files


def test_hard_negatives_never_the_examples_own_target(retriever):
    """data.train_on_val=true with hard negatives: a validation target is in its user's retrieved pool (the
    retriever ranked the val split), and it must never be drawn as that example's own negative."""
    out, cfg, _ = retriever
    cfg.data.train_negatives, cfg.data.retriever, cfg.data.train_on_val = "retrieved", str(out), True
    cfg.data.selection_share = 0.1
    dm = run.build_datamodule(cfg)
    dm.load_domains()
    run.attach_backbone(cfg, dm, None)
    dm.setup("fit")
    ds, pools = dm.train_loaders()["train"].dataset, dm.samplers["tools"].pools
    in_pool = 0
    for idx, (_, ex) in enumerate(ds.entries):
        in_pool += int(ex.target in pools[ex.user].tolist())
        for epoch in range(3):
            _, _, cands, pos = ds[(idx, epoch)]
            assert cands.count(ex.target) == 1 and cands[pos] == ex.target, (idx, epoch, cands)
    assert in_pool > 0  # the case that matters occurs in this data


def test_sasrec_paper_defaults():
    """The config's dropout (0.5) and training examples (per sequence) are the class defaults, and the recipe's
    Adam has the paper's beta2 0.98."""
    import hydra

    cfg = config(Path("/tmp/unused"))
    assert SASRecModule(num_items=5).net.drop.p == cfg.method.module.dropout == 0.5
    assert SASRecModule(num_items=5).train_on == cfg.method.module.train_on == "sequence"
    opt = hydra.utils.instantiate(cfg.recipe.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("train_on", ["last", "sequence"])
def test_bce_draws_one_negative_a_positive(train_on):
    """loss=bce: the positive against ONE negative: under ``last`` the first non-target candidate decides
    the loss, the other negatives do not; under ``sequence`` one negative a position."""
    torch.manual_seed(0)
    m = SASRecModule(num_items=30, max_len=5, hidden=8, loss="bce", train_on=train_on).eval()
    a = IdCollator(5)([("d", (1, 2, 3), [4, 5, 6, 7], 0), ("d", (7,), [8, 9, 10, 11], 2)])
    b = IdCollator(5)([("d", (1, 2, 3), [4, 5, 20, 21], 0), ("d", (7,), [8, 22, 10, 23], 2)])
    if train_on == "last":
        assert float(m.objective(a)) == pytest.approx(float(m.objective(b)))
        c = IdCollator(5)([("d", (1, 2, 3), [4, 25, 6, 7], 0), ("d", (7,), [24, 9, 10, 11], 2)])
        assert float(m.objective(a)) != pytest.approx(float(m.objective(c)))
    else:
        history, nexts = m.transitions(a)
        neg = m.negatives(history, nexts)
        assert neg.shape == nexts.shape
        row = torch.cat([history, nexts[:, -1:]], 1)
        assert not (neg.unsqueeze(-1) == row.unsqueeze(1)).any()


def transitions_seen(dm, module) -> list[tuple]:
    """The (user, previous item, next item) transitions a module trains on in one epoch of ``dm``."""
    dm.setup("fit")
    ds = dm.train_loaders()["train"].dataset
    out = []
    for idx, (_, ex) in enumerate(ds.entries):
        batch = IdCollator(dm.max_history)([ds[(idx, 0)]])
        if module.train_on == "last":
            out.append((ex.user, int(batch["history"][0, -1]), int(batch["candidates"][0, batch["labels"][0]]) + 1))
            continue
        history, nexts = module.transitions(batch)
        out += [(ex.user, int(h), int(n)) for h, n in zip(history[0], nexts[0]) if n > 0]
    return sorted(out)


@pytest.mark.parametrize("train_on_val", [False, True])
def test_sequence_sees_the_same_transitions(train_on_val):
    """train_on=sequence: one window a user (two for a user longer than max_history), the loss at every
    position: exactly the transitions of every prefix (train_on=last), in fewer examples."""
    synth = {"tools": {"source": "synthetic", "num_users": 40, "num_items": 50, "min_len": 4, "max_len": 14}}
    seen, sizes = {}, {}
    for train_on in ("last", "sequence"):
        dm = RecDataModule.from_config(domains=synth, target="tools", max_history=5, train_on_val=train_on_val, selection_share=0.1)
        dm.load_domains()
        module = SASRecModule(num_items=dm.domains["tools"].num_items, max_len=5, hidden=8, train_on=train_on)
        dm.attach_ids().train_only(None, module.train_examples())
        seen[train_on] = transitions_seen(dm, module)
        sizes[train_on] = len(dm.train_entries["train"])
    assert seen["sequence"] == seen["last"] and len(seen["last"]) == sizes["last"]
    assert sizes["sequence"] * 2 < sizes["last"]
    assert max(len(s) for s in dm.domains["tools"].sequences) > 5 + 3  # some user needs two windows


def test_train_on_is_checked():
    with pytest.raises(Exception, match="method.module.train_on"):
        SASRecModule(num_items=5, train_on="all")


@pytest.mark.parametrize("train_on", ["last", "sequence"])
def test_both_modes_train_through_the_pipeline(train_on, tmp_path):
    """Both modes train through the real pipeline (the loss falls) and evaluate; ``sequence`` trains on one
    window a user, far fewer examples than the prefixes."""
    cfg = config(tmp_path / "run", f"method.module.train_on={train_on}", "recipe.max_epochs=3")
    _, metrics = run.train(cfg)
    assert 0.0 <= metrics["test/ndcg@10"] <= 1.0
    n = metrics["data/train_examples"]  # 60 users of 5-12 items: ~60 windows, ~300 prefixes
    assert (n <= 60 * 2) == (train_on == "sequence"), n


def test_sequence_benchmark_prints_the_ratio(capsys):
    """benchmarks/sasrec_sequence.py: both modes timed in one process, the ratio of their epochs/s printed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sasrec_bench", REPO / "benchmarks" / "sasrec_sequence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--num-users", "80", "--num-items", "60", "--steps", "1", "--rounds", "1", "--batch-size", "16"])
    assert "ratio sequence / last" in capsys.readouterr().out
    f = out["figures"]
    assert f["sequence/examples"] == 80 and f["last/examples"] > 80
    assert f["sequence_over_last_epochs_per_s"] == pytest.approx(f["sequence/epochs_per_s"] / f["last/epochs_per_s"])
