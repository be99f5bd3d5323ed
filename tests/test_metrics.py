"""Ranking metrics against values worked out by hand: HR@k, NDCG@k, MRR, ties, NaN, accumulation,
synchronisation across processes, and the random / popularity reference rankers."""

import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from recsys.core.metrics import KS, RankingMetrics, reference_metrics, target_rank

C = 12


def scores_with_rank(rank: int, target_pos: int, c: int = C) -> list[float]:
    """A score row where the target (at ``target_pos``) has exactly ``rank`` candidates above it."""
    others = [100.0 - j for j in range(c - 1)]  # strictly decreasing, distinct
    above, below = others[:rank], [x - 200.0 for x in others[rank:]]  # below the target's 0.0
    row = above + below
    row.insert(target_pos, 0.0)
    return row


# Five users with ranks 0, 2, 4, 9, 11 (0-based; 11 = last of 12), targets at assorted positions.
RANKS = [0, 2, 4, 9, 11]
TPOS = [3, 0, 11, 5, 7]


def hand_values() -> dict[str, float]:
    """The expected averages, computed with the textbook formulas (not the code under test)."""
    out = {}
    for k in KS:
        out[f"hr@{k}"] = sum(1.0 for r in RANKS if r < k) / len(RANKS)
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in RANKS if r < k) / len(RANKS)
    out["mrr"] = sum(1.0 / (r + 1) for r in RANKS) / len(RANKS)
    return out


def batch():
    s = torch.tensor([scores_with_rank(r, p) for r, p in zip(RANKS, TPOS)])
    return s, torch.tensor(TPOS)


def compute(scores, target) -> dict[str, float]:
    m = RankingMetrics()
    m.update(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(target))
    return {k: float(v) for k, v in m.compute().items()}


def test_hand_values_all_ks():
    s, t = batch()
    assert target_rank(s, t).tolist() == RANKS
    got = compute(s, t)
    exp = hand_values()
    assert set(got) == set(exp) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 3, 5, 10)} | {"mrr"}
    for k, v in exp.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    # spot values by hand: HR@1 = 1/5, HR@3 = 2/5, HR@5 = 3/5, HR@10 = 4/5
    assert (got["hr@1"], got["hr@3"], got["hr@5"], got["hr@10"]) == pytest.approx((0.2, 0.4, 0.6, 0.8))
    # NDCG@3 = (1 + 1/log2(4)) / 5 = 1.5 / 5
    assert got["ndcg@3"] == pytest.approx(0.3, abs=1e-6)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 / 10 + 1 / 12) / 5, abs=1e-6)


def test_single_small_example():
    # target 0.5 at position 2; only 0.9 above it -> rank 1
    got = compute([[0.1, 0.9, 0.5, 0.3]], [2])
    assert got["hr@1"] == 0 and got["hr@3"] == 1
    assert got["ndcg@3"] == pytest.approx(1 / math.log2(3), abs=1e-6)
    assert got["mrr"] == pytest.approx(0.5)


def test_ties_count_against_target():
    # the target ties with one other candidate: it ranks below it (rank 1), never first
    got = compute([[2.0, 1.0, 2.0, 0.0]], [0])
    assert got["hr@1"] == 0 and got["mrr"] == pytest.approx(0.5)
    got = compute([[2.0, 2.0, 2.0, 3.0]], [1])  # 3 others >= target -> rank 3
    assert got["hr@3"] == 0 and got["hr@5"] == 1 and got["mrr"] == pytest.approx(0.25)


@pytest.mark.parametrize("c", [5, 20])
def test_constant_scorer_is_last(c):
    n = 7
    got = compute(torch.zeros(n, c), torch.arange(n) % c)
    assert got["hr@1"] == 0.0 and got["ndcg@1"] == 0.0
    assert got["mrr"] == pytest.approx(1 / c)
    assert got["hr@10"] == (1.0 if c <= 10 else 0.0)


def test_nan_scores():
    # a NaN target ranks last
    got = compute([[float("nan"), 1.0, 2.0, 3.0]], [0])
    assert got["hr@3"] == 0 and got["mrr"] == pytest.approx(1 / 4)
    # a NaN other candidate is never below the target: target 5.0 is the best real score -> rank 1
    got = compute([[5.0, float("nan"), 1.0, 2.0]], [0])
    assert got["hr@1"] == 0 and got["hr@3"] == 1 and got["mrr"] == pytest.approx(0.5)
    # all NaN: last, like a constant scorer
    got = compute(torch.full((3, 6), float("nan")), torch.tensor([0, 3, 5]))
    assert got["hr@5"] == 0 and got["mrr"] == pytest.approx(1 / 6)


def test_accumulates_over_updates_and_resets():
    s, t = batch()
    m = RankingMetrics()
    m.update(s[:2], t[:2])
    m.update(s[2:3], t[2:3])
    m.update(s[3:], t[3:])
    got = {k: float(v) for k, v in m.compute().items()}
    exp = hand_values()
    for k in exp:
        assert got[k] == pytest.approx(exp[k], abs=1e-6)
    assert int(m.count) == 5
    m.reset()
    m.update(s[:1], t[:1])  # only the rank-0 user
    assert float(m.compute()["mrr"]) == 1.0 and float(m.compute()["hr@1"]) == 1.0


def test_update_accepts_half_precision_scores():
    s, t = batch()
    got = compute(s.to(torch.bfloat16), t)
    assert got["hr@1"] == pytest.approx(0.2)


def test_merge_state_equals_one_metric():
    """Two shards' states merged (what the distributed sum does) equal one metric over all examples."""
    s, t = batch()
    a, b = RankingMetrics(), RankingMetrics()
    a.update(s[:3], t[:3])
    b.update(s[3:], t[3:])
    a.merge_state(b)
    got = {k: float(v) for k, v in a.compute().items()}
    exp = hand_values()
    for k in exp:
        assert got[k] == pytest.approx(exp[k], abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, t = batch()
        # uneven shards: rank 0 has 3 users, rank 1 has 2
        sl = slice(0, 3) if rank == 0 else slice(3, 5)
        m = RankingMetrics()
        m.update(s[sl], t[sl])
        queue.put((rank, {k: float(v) for k, v in m.compute().items()}))
    finally:
        dist.destroy_process_group()


def test_sync_across_two_gloo_processes():
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    exp = hand_values()
    for r in (0, 1):  # every rank sees the global value, not its shard's
        for k in exp:
            assert results[r][k] == pytest.approx(exp[k], abs=1e-6), (r, k)


def test_reference_metrics_by_hand():
    cands = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    target = np.array([2, 0, 1])
    counts = np.array([5, 1, 9, 0, 2, 2, 4, 4, 4])
    # popularity ranks: row0 target 9 is the max -> 0; row1 target 0 below 2, 2 -> 2;
    # row2 all tie at 4 -> 2 (ties against the target)
    ref = reference_metrics(cands, target, counts, seed=0)
    assert set(ref) == {"random", "popularity"}
    pop = ref["popularity"]
    assert pop["hr@1"] == pytest.approx(1 / 3)
    assert pop["hr@3"] == pytest.approx(1.0)
    assert pop["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert pop["ndcg@3"] == pytest.approx((1 + 2 * 0.5) / 3)
    assert set(ref["random"]) == set(pop)
    # the random ranker is seeded
    assert reference_metrics(cands, target, counts, seed=0)["random"] == ref["random"]


def test_random_ranker_is_near_chance():
    rng = np.random.default_rng(1)
    n, c = 4000, 20
    cands = rng.integers(0, 1000, size=(n, c))
    target = rng.integers(0, c, size=n)
    counts = rng.integers(0, 50, size=1000)
    a = reference_metrics(cands, target, counts, seed=3)["random"]
    b = reference_metrics(cands, target, counts, seed=4)["random"]
    assert a != b
    assert a["hr@1"] == pytest.approx(1 / c, abs=0.02)
    assert a["hr@10"] == pytest.approx(10 / c, abs=0.04)
    assert a["mrr"] == pytest.approx(sum(1 / r for r in range(1, c + 1)) / c, abs=0.02)


def test_popularity_ranker_prefers_popular_targets():
    # targets are the most popular candidate of each row -> perfect popularity ranker
    cands = np.arange(40).reshape(4, 10)
    counts = np.arange(40)
    got = reference_metrics(cands, np.full(4, 9), counts)["popularity"]
    assert got["hr@1"] == 1.0 and got["mrr"] == 1.0
    # ... and the least popular one -> last
    got = reference_metrics(cands, np.zeros(4, dtype=int), counts)["popularity"]
    assert got["hr@5"] == 0.0 and got["mrr"] == pytest.approx(1 / 10)

