"""SASRec (the ID baseline), per-user ranks, full-catalogue evaluation and two-stage candidates, end to
end on a tiny synthetic domain in seconds: no language model is loaded."""

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from recsys import ranks, run
from recsys.data.datamodule import RecDataModule
from recsys.data.domain import DataError
from recsys.data.ids import IdCollator
from recsys.metrics import eval_ranks
from recsys.methods.sasrec import SASRecModule

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`", "ignore:The ``compute`` method")
REPO = Path(__file__).resolve().parents[1]
K = 5
TINY = ["method=sasrec", "logger=none", "~callbacks.rich_progress_bar", "trainer.precision=32-true",
        "recipe.max_epochs=2", "recipe.batch_size=32", "data.max_eval_users=null", "data.max_train_examples=null",
        "data.domains.tools.num_users=60", "data.domains.tools.num_items=40", f"eval.retrieve_k={K}",
        "method.module.hidden=16", "data.max_history=8"]


def config(out: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "recsys" / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={out}", f"paths.adapter_store={out.parent / 'store'}",
                                           f"paths.cache_dir={out.parent / 'cache'}", *TINY, *overrides])


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


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_both_losses_train(loss):
    torch.manual_seed(0)
    m = SASRecModule(num_items=30, max_len=5, hidden=8, loss=loss)
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
    from recsys.metrics import RankingMetrics

    m = RankingMetrics()
    m.update(module.score(batch).detach(), batch["labels"])
    assert float(m.compute()["hr@10"]) == pytest.approx(found.mean())


def test_retrieved_needs_a_retriever(tmp_path):
    synth = {"tools": {"source": "synthetic", "num_users": 20, "num_items": 30}}
    with pytest.raises(DataError, match="data.retriever"):
        RecDataModule(synth, target="tools", candidates="retrieved")
    dm = RecDataModule(synth, target="tools", candidates="retrieved", retriever=str(tmp_path))
    with pytest.raises(DataError, match="no retrieved.npz"):
        dm.setup()
