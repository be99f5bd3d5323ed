"""Intervals over seeds and paired tests over users (recsys.evaluation.significance), checked against hand computations,
and the report's paired comparisons over a multirun of seeds 0, 1, 2 with ranks files."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from recsys.evaluation import ranks
from recsys.evaluation import significance as stats
from recsys.evaluation.tables import METRICS, write_report

G = {r: 1 / math.log2(r + 1) for r in (1, 2, 3, 4, 5, 6)}  # NDCG@10 of a single item at 1-based rank r


def test_mean_ci_by_hand():
    mean, half = stats.mean_ci([0.50, 0.52, 0.54])
    # mean 0.52, sample std 0.02, t(0.975, df=2) = 4.302653
    assert mean == pytest.approx(0.52) and half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert math.isnan(stats.mean_ci([0.5])[1]) and stats.t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    assert stats.standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def test_wilcoxon_exact_by_hand():
    # d = a - b = [1, .5, .2440, .0745, -.3691, -.0693, 0]: the zero is dropped, n = 6, no ties;
    # |d| ranks: .0693 -> 1 (-), .0745 -> 2 (+), .2440 -> 3 (+), .3691 -> 4 (-), .5 -> 5 (+), 1 -> 6 (+)
    # W+ = 2 + 3 + 5 + 6 = 16, W- = 1 + 4 = 5. Of the 2^6 = 64 sign patterns, 10 have W+ <= 5 ({}, {1}, {2},
    # {3}, {4}, {5}, {1,2}, {1,3}, {1,4}, {2,3}): p = 2 * 10 / 64 = 0.3125; r = (16 - 5) / 21.
    a = np.array([G[1], G[1], G[2], G[4], G[2], G[4], G[1]])
    b = np.array([0.0, G[3], G[5], G[6], G[1], G[3], G[1]])
    w = stats.wilcoxon(a, b)
    assert (w.n, w.w_plus, w.w_minus, w.statistic, w.method) == (6, 16.0, 5.0, 5.0, "exact")
    assert w.p == pytest.approx(20 / 64) and w.r == pytest.approx(11 / 21)


def test_wilcoxon_normal_with_ties_by_hand():
    # d = [1, 1, -1, 2, 2, 2, -3, 4] (ties: no exact test). |d| ranks: 1,1,1 -> 2; 2,2,2 -> 5; 3 -> 7; 4 -> 8.
    # W+ = 2 + 2 + 5 * 3 + 8 = 27, W- = 2 + 7 = 9; mean n(n+1)/4 = 18;
    # var = 8 * 9 * 17 / 24 - ((27 - 3) + (27 - 3)) / 48 = 51 - 1 = 50; z = 9 / sqrt(50); p = erfc(|z| / sqrt 2)
    d = np.array([1, 1, -1, 2, 2, 2, -3, 4], dtype=float)
    w = stats.wilcoxon(d, np.zeros_like(d))
    assert (w.w_plus, w.w_minus, w.method) == (27.0, 9.0, "normal")
    assert w.p == pytest.approx(math.erfc(9 / math.sqrt(50) / math.sqrt(2))) and w.r == pytest.approx(18 / 36)


def test_wilcoxon_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (10, 45, 400):
        a, b = rng.random(n), rng.random(n) + 0.05
        assert stats.wilcoxon(a, b).p == pytest.approx(scipy_stats.wilcoxon(a, b).pvalue, rel=1e-9)
    a, b = np.round(rng.random(300), 1), np.round(rng.random(300), 1)  # ties and zeros
    assert stats.wilcoxon(a, b).p == pytest.approx(scipy_stats.wilcoxon(a, b, method="approx").pvalue, rel=1e-9)


def test_a_p_value_below_the_smallest_double_never_reads_as_zero():
    # 20,000 users all better by a little (a pooled SASRec-vs-popularity pair): z of about 122, whose normal tail
    # underflows to 0.0; the tables say how small, not 0
    w = stats.wilcoxon(np.arange(20_000) % 7 + 1.0, np.zeros(20_000))
    assert w.p == 0.0 and stats.format_p_wilcoxon(w.p) == "< 1e-300"
    assert stats.format_p_wilcoxon(0.0123) == "0.0123" and stats.format_p_wilcoxon(0.0123, 2) == "0.012"
    assert stats.format_p_bootstrap(0.0) == "< 2e-04"


def test_scipy_statistics_keep_the_hand_computed_numbers():
    """significance.py now calls scipy (t quantiles, ranks, the signed-rank test); the expected numbers are
    what the earlier hand-written versions (a t table, an exact signed-rank count, the normal approximation
    with the tie correction) gave on these inputs, computed before the change."""
    rng = np.random.default_rng(7)
    exact = (rng.random(12), rng.random(12) + 0.1)
    ties = (np.round(rng.random(40), 1), np.round(rng.random(40), 1))
    normal = (rng.random(80), rng.random(80))
    for (a, b), (n, w_plus, w_minus, p, r, method) in [
        (exact, (12, 32.0, 46.0, 0.6220703125, -0.1794871794871795, "exact")),
        (ties, (37, 331.0, 372.0, 0.7565966916891218, -0.05832147937411095, "normal")),
        (normal, (80, 2050.0, 1190.0, 0.03916933706903223, 0.2654320987654321, "normal")),
    ]:
        w = stats.wilcoxon(a, b)
        assert (w.n, w.w_plus, w.w_minus, w.method) == (n, w_plus, w_minus, method)
        assert w.p == pytest.approx(p, rel=1e-12) and w.r == pytest.approx(r, rel=1e-12)
    for df, level, q in [(2, 0.95, 4.302652729749462), (9, 0.95, 2.262157162798205), (30, 0.95, 2.0422724563012378),
                         (5, 0.9, 2.0150483733330233)]:
        assert stats.t_quantile(df, level) == pytest.approx(q, rel=1e-12)
    assert stats.mean_ci([0.1, 0.15, 0.3]) == pytest.approx((0.18333333333333335, 0.25855725062711316), rel=1e-12)
    c = stats.compare_paired([0.5, 0.2, 0.9, 0.3, 0.7, 0.1, 0.6, 0.8, 0.4, 0.45],
                             [0.4, 0.25, 0.5, 0.3, 0.6, 0.2, 0.5, 0.6, 0.35, 0.5], resamples=2000)
    expected = {"users": 10, "mean_a": 0.495, "mean_b": 0.42, "delta": 0.075, "ci_lo": -0.005, "ci_hi": 0.165,
                "p_bootstrap": 0.061, "p_wilcoxon": 0.13690647995474461, "wilcoxon_method": "normal",
                "rank_biserial": 0.5555555555555556, "se_a": 0.08180260794538684, "se_b": 0.0448454134902457}
    assert c.keys() == expected.keys()
    for key, value in expected.items():
        assert c[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9, abs=1e-12)), key


def test_a_paired_test_needs_six_users():
    """With 2 users the old record printed r +1.000 and with 0 a Wilcoxon p of 1: fewer than 6 (where no
    two-sided signed-rank p can reach 0.05) are refused."""
    with pytest.raises(ValueError, match="2 paired users: too few"):
        stats.compare_paired([0.5, 0.6], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 paired users"):
        stats.compare_paired([], [])
    assert stats.compare_paired(np.arange(6.0), np.zeros(6))["users"] == 6


def test_paired_bootstrap():
    b = stats.paired_bootstrap(np.full(50, 0.6), np.full(50, 0.5), resamples=200)
    assert b.mean == pytest.approx(0.1) and b.lo == pytest.approx(0.1) and b.hi == pytest.approx(0.1) and b.p == 0.0
    assert stats.paired_bootstrap(np.ones(10), np.ones(10), resamples=200).p == 1.0
    rng = np.random.default_rng(1)
    a, c = rng.normal(0.5, 0.3, 4000), rng.normal(0.5, 0.3, 4000)
    boot = stats.paired_bootstrap(a, c, resamples=2000)
    se = np.std(a - c, ddof=1) / math.sqrt(4000)  # the interval is about mean -+ 1.96 se
    assert boot.hi - boot.lo == pytest.approx(2 * 1.96 * se, rel=0.1) and 0.0 < boot.p <= 1.0
    assert stats.paired_bootstrap(a, c, resamples=500, seed=3) == stats.paired_bootstrap(a, c, resamples=500, seed=3)


# ---------------------------------------------------------------------------------------------- the report
A_RANKS = [1, 1, 2, 4, 2, 4, 1]  # method a (the best), per user; NDCG@10 as in test_wilcoxon_exact_by_hand
B_RANKS = [11, 3, 5, 6, 1, 3, 1]  # method b: rank 11 is outside the top 10 (NDCG 0)


def job(root: Path, num: int, method: str, seed: int, user_ranks: list[int], data: dict | None = None,
        overrides: tuple = (), val: float | None = None, first_user: int = 0) -> Path:
    """A job folder with per-user ranks; ``data``: more data settings, ``val``: its val/ndcg@10 (default: test's)."""
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "method": {"name": method}, "backbone": {"name": "none"},
                                     "data": {"target": "beauty", "sources": [], "target_fraction": 1.0,
                                              **(data or {})}}),
                   d / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"method={method}", f"seed={seed}", *overrides]), d / ".hydra" / "overrides.yaml")
    nd = ranks.ndcg(pd.array(user_ranks, dtype="Int64"))
    metrics = {f"{split}/{m}": float(nd.mean()) + 0.001 * seed for m in METRICS for split in ("val", "test")}
    if val is not None:
        metrics["val/ndcg@10"] = val
    (d / "metrics.json").write_text(json.dumps(metrics))
    users = [f"u{i}" for i in range(first_user, first_user + len(user_ranks))]
    ranks.write(d, pd.DataFrame({"domain": "beauty", "user": users,
                                 "split": "test", "target": "i0", "rank": pd.array(user_ranks, dtype="Int64"),
                                 "n_candidates": 20}))
    return d


def test_report_over_seeds_prints_intervals_and_paired_p_values(tmp_path):
    """A multirun of seeds 0, 1, 2 of two methods (the same per-user ranks each seed): the table shows the
    t intervals and the paired Wilcoxon p of the hand computation (0.3125), bootstrap and effect size."""
    root = tmp_path / "multirun"
    n = 0
    for seed in (0, 1, 2):
        for method, r in (("sasrec", A_RANKS), ("lora", B_RANKS)):
            job(root, n, method, seed, r)
            n += 1
    write_report([root], tmp_path / "report", wandb="off")
    md = (tmp_path / "report" / "report.md").read_text()
    paired = pd.read_csv(next((tmp_path / "report" / "tables").glob("*_paired.csv")))
    c = paired.iloc[0]
    a = np.array([G[1], G[1], G[2], G[4], G[2], G[4], G[1]])
    b = np.array([0.0, G[3], G[5], G[6], G[1], G[3], G[1]])
    assert (c["a"], c["b"], c["users"], c["seeds"]) == ("sasrec", "lora", 7, 3)
    assert c["p_wilcoxon"] == pytest.approx(20 / 64) and c["rank_biserial"] == pytest.approx(11 / 21)
    assert c["delta"] == pytest.approx((a - b).mean()) and c["ci_lo"] <= c["delta"] <= c["ci_hi"]
    assert 0.0 < c["p_bootstrap"] <= 1.0
    # intervals: mean of seeds (x, x + .001, x + .002) -+ t(.975, 2) * .001 / sqrt(3)
    half = 4.302653 * 0.001 / math.sqrt(3)
    x = a.mean() + 0.001
    assert f"**{x:.4f} [{x - half:.4f}, {x + half:.4f}]**" in md
    assert f"{-(a - b).mean():+.4f}, 0.31" in md and "| best |" in md


def test_report_pairs_a_method_with_the_reference_rows_of_its_runs(tmp_path):
    """One method over seeds 0, 1, 2: its popularity and zero-shot rows (ranked in the same runs, on the same
    candidates) are paired with it user by user, from the splits popularity/test and zero_shot/test."""
    root = tmp_path / "multirun"
    for seed in (0, 1, 2):
        job(root, seed, "lora", seed, A_RANKS)
        d = root / str(seed)
        metrics = json.loads((d / "metrics.json").read_text())
        for row in ("popularity", "zero_shot"):
            metrics.update({f"{row}/test/{m}": 0.1 for m in METRICS})
        (d / "metrics.json").write_text(json.dumps(metrics))
        df = ranks.read(d)
        extra = [df.assign(split=f"{row}/test", rank=pd.array(r, dtype="Int64"))
                 for row, r in (("popularity", B_RANKS), ("zero_shot", [20] * len(A_RANKS)))]
        (d / ranks.FILE).unlink()
        ranks.write(d, pd.concat([df, *extra], ignore_index=True))
    write_report([root], tmp_path / "report", wandb="off")
    paired = pd.read_csv(next((tmp_path / "report" / "tables").glob("*_paired.csv"))).set_index("b")
    assert set(paired.index) == {"popularity", "zero-shot"} and (paired["a"] == "lora").all()
    assert paired.loc["popularity", "p_wilcoxon"] == pytest.approx(20 / 64)
    assert paired.loc["popularity", "seeds"] == 3 and paired.loc["popularity", "users"] == 7
    assert paired.loc["zero-shot", "mean_b"] == 0.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| popularity | 3 |" in md and ", 0.31" in md


def test_ranks_paired_cli_by_hand(tmp_path, capsys):
    """python -m recsys.evaluation.ranks a b --paired: the hand-computed Wilcoxon p and mean difference; `@split` picks a
    row of the same file; runs of other users or targets are refused."""
    job(tmp_path, 0, "sasrec", 0, A_RANKS)
    job(tmp_path, 1, "lora", 0, B_RANKS)
    a, b = tmp_path / "0", tmp_path / "1"
    out = ranks.main([str(a), str(b), "--paired"])
    c = out.iloc[0]
    assert c["users"] == 7 and c["p_wilcoxon"] == pytest.approx(20 / 64)
    assert c["delta"] == pytest.approx(ranks.ndcg(pd.array(A_RANKS)).mean() - ranks.ndcg(pd.array(B_RANKS)).mean())
    assert "p Wilcoxon 0.312" in capsys.readouterr().out
    df = ranks.read(b)
    ranks.write(a, df.assign(split="popularity/test"))
    assert ranks.paired(a, f"{a}@popularity/test")["p_wilcoxon"] == pytest.approx(20 / 64)
    ranks.write(b, df.assign(target="other"))
    with pytest.raises(ValueError, match="another target"):
        ranks.paired(a, b)
    with pytest.raises(ValueError, match="no rows of split"):
        ranks.paired(a, f"{b}@val")
    with pytest.raises(SystemExit) as e:  # a run without ranks: the command says how to make them
        ranks.main([str(a), str(tmp_path / "old_run"), "--paired"])
    assert e.value.code == 2 and "python evaluate.py run_dir=" in capsys.readouterr().err


def test_ranks_paired_refuses_runs_of_other_candidates(tmp_path, capsys):
    """Seed 0 against seed 1 (other candidate lists for the same users) printed p 0.023 as if paired: now
    refused, naming the setting; so is another data.num_negatives, and a run with no config beside it."""
    a = job(tmp_path, 0, "sasrec", 0, A_RANKS)
    b = job(tmp_path, 1, "lora", 1, B_RANKS)
    with pytest.raises(SystemExit) as e:
        ranks.main([str(a), str(b), "--paired"])
    assert e.value.code == 2 and "other candidates (seed: 0 vs 1)" in capsys.readouterr().err
    c = job(tmp_path, 2, "lora", 0, B_RANKS, data={"num_negatives": 49})
    with pytest.raises(ValueError, match="data.num_negatives: None vs 49"):
        ranks.paired(a, c)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / ranks.FILE).write_bytes((b / ranks.FILE).read_bytes())
    with pytest.raises(ValueError, match="no .hydra/config.yaml or config.yaml"):
        ranks.paired(a, bare / ranks.FILE)
    assert ranks.main([str(a), str(bare), "--paired", "--unchecked"]).iloc[0]["users"] == 7


def test_ranks_paired_refuses_too_few_shared_users(tmp_path, capsys):
    """2 shared users printed r +1.000: fewer than 6 are refused."""
    a = job(tmp_path, 0, "sasrec", 0, A_RANKS)
    b = job(tmp_path, 1, "lora", 0, B_RANKS, first_user=5)  # users u5..u11: u5, u6 shared
    with pytest.raises(SystemExit) as e:
        ranks.main([str(a), str(b), "--paired"])
    assert e.value.code == 2 and "2 paired users: too few" in capsys.readouterr().err


def test_report_chooses_the_best_row_on_validation(tmp_path):
    """lora is better on test, sasrec on validation: sasrec is the best row (bold, paired against), chosen on
    val/ndcg@10 as model selection chooses; test never chooses (it chose lora before)."""
    root = tmp_path / "multirun"
    for seed in (0, 1):
        job(root, 2 * seed, "sasrec", seed, B_RANKS, val=0.9)
        job(root, 2 * seed + 1, "lora", seed, A_RANKS, val=0.1)
    write_report([root], tmp_path / "report", wandb="off")
    md = (tmp_path / "report" / "report.md").read_text()
    sasrec = next(line for line in md.splitlines() if line.startswith("| sasrec |"))
    lora = next(line for line in md.splitlines() if line.startswith("| lora |"))
    assert "**0.9000**" in sasrec and "| best |" in sasrec and "**" not in lora
    assert "val/ndcg@10 (chooses)" in md
    paired = pd.read_csv(next((tmp_path / "report" / "tables").glob("*_paired.csv")))
    assert (paired.iloc[0]["a"], paired.iloc[0]["b"]) == ("sasrec", "lora") and paired.iloc[0]["delta"] < 0


def test_report_pairs_only_runs_of_the_same_candidates(tmp_path):
    """Two variants that ranked other candidate lists (data.num_negatives 19 vs 49) are in one table but are
    not paired: the table says which setting differs. Disjoint users (0 paired) give no Wilcoxon p of 1."""
    root = tmp_path / "multirun"
    for seed in (0, 1):
        job(root, 3 * seed, "sasrec", seed, A_RANKS, overrides=("data.num_negatives=19",), data={"num_negatives": 19})
        job(root, 3 * seed + 1, "lora", seed, B_RANKS, overrides=("data.num_negatives=49",), data={"num_negatives": 49},
            val=0.0)
        job(root, 3 * seed + 2, "joint", seed, B_RANKS, overrides=("data.num_negatives=19",), data={"num_negatives": 19},
            val=0.0, first_user=100)
    write_report([root], tmp_path / "report", wandb="off")
    paired = pd.read_csv(next((tmp_path / "report" / "tables").glob("*_paired.csv"))).set_index("b")
    lora, joint = "lora [data.num_negatives=49]", "joint [data.num_negatives=19]"
    assert "data.num_negatives: 19 vs 49" in paired.loc[lora, "skipped"]
    assert "0 paired users: too few" in paired.loc[joint, "skipped"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "not paired: seed 0: other candidates (data.num_negatives: 19 vs 49)" in md
    assert "| 1 (exact) |" not in md and "| 1 (normal) |" not in md


def test_a_broken_ranks_file_is_one_line_and_the_report_goes_on(tmp_path, capsys):
    """A ranks.csv.gz that is not gzip: ``ranks --paired`` says so in one line (a traceback before), and the
    report lists that pair as not paired, naming the file, and pairs the others."""
    root = tmp_path / "multirun"
    for seed in (0, 1):
        job(root, 3 * seed, "sasrec", seed, A_RANKS)
        job(root, 3 * seed + 1, "lora", seed, B_RANKS, val=0.0)
        job(root, 3 * seed + 2, "joint", seed, B_RANKS, val=0.0)
    for seed in (0, 1):
        (root / str(3 * seed + 2) / ranks.FILE).write_bytes(b"not gzip")
    with pytest.raises(SystemExit) as e:
        ranks.main([str(root / "0"), str(root / "2"), "--paired"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a ranks file (BadGzipFile" in err and len(err.strip().splitlines()) == 1
    write_report([root], tmp_path / "report", wandb="off")
    paired = pd.read_csv(next((tmp_path / "report" / "tables").glob("*_paired.csv"))).set_index("b")
    assert "ranks.csv.gz: not a ranks file" in paired.loc["joint", "skipped"]
    assert paired.loc["lora", "p_wilcoxon"] == pytest.approx(20 / 64)
