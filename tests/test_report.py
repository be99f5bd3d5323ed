"""The report command: tables (Markdown, CSV) of mean +- std over seeds per target and setting, the
reference rows, failed jobs listed, PNG plots, wandb (offline).

A made-up sweep folder with known numbers checks the arithmetic and the layout; a real sweep of two
jobs through submitit's local executor (one of them failing) checks the command end to end.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from recsys.evaluation.tables import METRICS, find_jobs, main, write_report

REPO = Path(__file__).resolve().parents[1]
BASE = {"lora": 0.30, "xcross": 0.40}


def fake_job(root: Path, num: int, method: str, target: str, seed: int, fraction: float = 1.0, sources=(),
             extra=(), status: str = "ok", wandb: bool = False, collection: str | None = None) -> Path:
    """A job folder as train.py writes it; test/<metric> = base + 0.1 * fraction + 0.01 * seed."""
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    cfg = {"seed": seed, "task_name": "train", "method": {"name": method},
           "data": {"target": target, "sources": list(sources), "target_fraction": fraction,
                    **({"collection": collection} if collection else {})},
           "backbone": {"name": "tiny:encoder"}, "paths": {"output_dir": "${hydra:runtime.output_dir}"},
           "logger": {"wandb": {"project": "recsys-test", "save_dir": "${paths.output_dir}"}} if wandb else None}
    OmegaConf.save(OmegaConf.create(cfg), d / ".hydra" / "config.yaml")
    overrides = [f"method={method}", f"data.target={target}", f"data.target_fraction={fraction}", f"seed={seed}",
                 "trainer.max_epochs=3", *extra]
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    value = BASE.get(method, 0.2) + 0.1 * fraction + 0.01 * seed
    if status == "ok":
        m = {f"test/{k}": value for k in METRICS}
        m.update({f"zero_shot/test/{k}": 0.05 for k in METRICS})
        m.update({f"random/test/{k}": 0.1 + 0.001 * seed for k in METRICS})
        m.update({f"popularity/test/{k}": 0.2 for k in METRICS})
        m.update({"params/trainable": 1000 if method == "lora" else 500, "time/train_s": 10.0 + seed,
                  "val/ndcg@10": value})
        (d / "metrics.json").write_text(json.dumps(m))
    elif status == "failed":
        (d / "failed.json").write_text(json.dumps({"error": "ValueError: source adapter missing for toys",
                                                   "traceback": "..."}))
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    n = 0
    for method in ("lora", "xcross"):
        for fraction in (0.25, 1.0):
            for seed in (0, 1, 2):
                fake_job(root, n, method, "tools", seed, fraction)
                n += 1
    fake_job(root, n, "xcross", "tools", 3, 0.25, status="failed")
    fake_job(root, n + 1, "lora", "tools", 3, 1.0, status="incomplete")
    for seed in (0, 1):
        fake_job(tmp_path / "other", seed, "lora", "toys", seed, 1.0)
    for i, fraction in enumerate((0.25, 1.0)):  # X-Cross with sources; LoRA ran without (above)
        fake_job(tmp_path / "other", 10 + i, "xcross", "tools", 0, fraction, sources=("toys", "beauty"))
    return tmp_path


def row(df, target, fraction, name, sources=""):
    r = df[(df.target == target) & (df.target_fraction == fraction) & (df.row == name)
           & (df.sources.fillna("") == sources)]
    assert len(r) == 1, (target, fraction, name, df[["target", "target_fraction", "row"]])
    return r.iloc[0]


def test_report_tables_and_plots(sweep):
    out = sweep / "report"
    result = write_report([sweep / "multirun", sweep / "other"], out, wandb="off")
    df = pd.read_csv(out / "results.csv")

    lora = row(df, "tools", 0.25, "lora")
    assert lora.n == 3 and lora.failed == 0 and lora.seeds == "0 1 2"
    for m in METRICS:  # mean over seeds 0, 1, 2 and sample std of (0, 0.01, 0.02)
        assert lora[f"{m}_mean"] == pytest.approx(0.30 + 0.025 + 0.01)
        assert lora[f"{m}_std"] == pytest.approx(0.01)
    assert lora.params_trainable == 1000 and lora.train_s_mean == pytest.approx(11.0)
    xc = row(df, "tools", 0.25, "xcross")
    assert xc.n == 3 and xc.failed == 1  # the failed seed is counted, not hidden
    assert row(df, "tools", 1.0, "lora").failed == 1  # the incomplete one too
    assert row(df, "tools", 1.0, "xcross")["ndcg@10_mean"] == pytest.approx(0.51)
    rnd = row(df, "tools", 1.0, "random")
    assert rnd.n == 3 and rnd["hr@1_mean"] == pytest.approx(0.101)  # one value a seed, not one a job
    assert row(df, "tools", 1.0, "popularity")["mrr_mean"] == pytest.approx(0.2)
    assert row(df, "tools", 1.0, "zero-shot (lora)")["ndcg@10_mean"] == pytest.approx(0.05)
    toys = row(df, "toys", 1.0, "lora")
    assert toys.n == 2 and math.isclose(toys["ndcg@10_mean"], 0.405)
    assert row(df, "toys", 1.0, "zero-shot")["n"] == 2  # one method: plain "zero-shot"

    md = (out / "report.md").read_text()
    assert "## tools: sources -, target fraction 0.25, tiny:encoder" in md
    # mean [95% t interval over 3 seeds]: 0.335 -+ t(0.975, 2) * 0.01 / sqrt(3) = 0.335 -+ 0.0248; xcross is best: bold
    assert "0.3350 [0.3102, 0.3598]" in md and "**0.4350 [0.4102, 0.4598]**" in md
    assert lora["ndcg@10_ci"] == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert "Failed and incomplete jobs (2)" in md and "source adapter missing for toys" in md
    assert "killed, or still running" in md
    jobs = pd.read_csv(out / "jobs.csv")
    assert len(jobs) == 18 and sorted(jobs.status.value_counts().items()) == [("failed", 1), ("incomplete", 1),
                                                                              ("ok", 16)]
    assert row(df, "tools", 0.25, "xcross", "toys+beauty").n == 1
    assert "## tools: sources toys+beauty, target fraction 0.25, tiny:encoder" in md
    assert len(result["tables"]) == 5 and all(p.with_suffix(".md").is_file() for p in result["tables"])
    names = sorted(p.name for p in result["plots"])
    assert names == ["bars_tools.png", "bars_toys.png", "efficiency_tools_none_tiny_encoder.png",
                     "efficiency_tools_toys+beauty_tiny_encoder.png"]
    for p in result["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"plots/{p.name}" in md


def test_variants_are_rows_of_their_own(tmp_path):
    """Jobs that differ in another swept key (here the learning rate) are not pooled as seeds."""
    for i, (lr, seed) in enumerate([(1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]):
        fake_job(tmp_path / "sweep", i, "lora", "tools", seed, extra=[f"recipe.optimizer.lr={lr}"])
    jobs = find_jobs([tmp_path / "sweep"])
    assert sorted({j.variant for j in jobs}) == ["recipe.optimizer.lr=0.001", "recipe.optimizer.lr=0.01"]
    df = pd.read_csv(write_report([tmp_path / "sweep"], tmp_path / "out", wandb="off")["csv"])
    methods = df[df.kind == "method"]
    assert len(methods) == 2 and set(methods.n) == {2}
    assert "lora [recipe.optimizer.lr=0.01]" in (tmp_path / "out" / "report.md").read_text()


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    """Runs that used the wandb logger: the tables and plots go to a wandb run (offline here)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for seed in (0, 1):
        fake_job(tmp_path / "sweep", seed, "lora", "tools", seed, wandb=True)
    result = write_report([tmp_path / "sweep"], tmp_path / "out")  # auto: the runs used wandb
    run_dir = Path(result["wandb"]).parent
    assert run_dir.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path / "out")
    assert any(run_dir.glob("*.wandb")) and list(run_dir.rglob("*.png"))


def test_report_reads_runs_logged_to_wandb_with_wandb_off(tmp_path):
    """A job logged with logger=wandb has ``logger.wandb.save_dir: ${paths.output_dir}`` ->
    ``${hydra:runtime.output_dir}``, which only resolves inside the run: the report reads it anyway
    (it crashed with UnsupportedInterpolationType ... full_key: logger.wandb.save_dir)."""
    for seed in (0, 1):
        fake_job(tmp_path / "sweep", seed, "lora", "tools", seed, wandb=True)
    jobs = find_jobs([tmp_path / "sweep"])
    assert [j.wandb_project for j in jobs] == ["recsys-test"] * 2
    result = write_report([tmp_path / "sweep"], tmp_path / "out", wandb="off")
    assert result["wandb"] is None and "2 jobs (2 ok)" in result["markdown"].read_text()


def test_report_keys_tables_by_data_identity(tmp_path):
    """Synthetic ``beauty`` and Amazon ``beauty`` share a name, not data: two tables, two bar plots (one table
    mixed them before)."""
    for seed in (0, 1):
        fake_job(tmp_path / "sweep", seed, "lora", "beauty", seed, collection="synthetic")
        fake_job(tmp_path / "sweep", 10 + seed, "lora", "beauty", seed, collection="amazon")
    result = write_report([tmp_path / "sweep"], tmp_path / "out", wandb="off")
    md = result["markdown"].read_text()
    assert "## amazon/beauty: sources -, target fraction 1, tiny:encoder" in md
    assert "## synthetic/beauty: sources -, target fraction 1, tiny:encoder" in md
    df = pd.read_csv(result["csv"])
    assert sorted(df[df.kind == "method"].collection) == ["amazon", "synthetic"] and set(df[df.kind == "method"].n) == {2}
    assert sorted(p.name for p in result["plots"]) == ["bars_amazon_beauty.png", "bars_synthetic_beauty.png"]


def test_report_lists_unreadable_folders_and_failed_jobs_and_goes_on(tmp_path, capsys):
    """A job folder with a broken metrics.json and one with a broken config: each listed in one line (in the
    report and on stderr), the other jobs reported (one bad folder stopped the report before); a failed job
    is listed too, with its error."""
    for seed in (0, 1, 2):
        fake_job(tmp_path / "sweep", seed, "lora", "tools", seed)
    (fake_job(tmp_path / "sweep", 3, "lora", "tools", 3) / "metrics.json").write_text("{not json")
    (fake_job(tmp_path / "sweep", 4, "lora", "tools", 4) / ".hydra" / "config.yaml").write_text("a: [unclosed")
    fake_job(tmp_path / "sweep", 5, "xcross", "tools", 0, status="failed")
    result = main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--wandb", "off"])
    md = result["markdown"].read_text()
    assert "## Folders that could not be read (2)" in md and "JSONDecodeError" in md
    assert pd.read_csv(result["csv"]).set_index("row").loc["lora", "n"] == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and sum(line.startswith("unreadable: ") for line in err) == 2
    assert any(line.startswith("failed: ") and "source adapter missing for toys" in line for line in err)


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_report_on_missing_or_empty_input_is_one_line(tmp_path, capsys, case):
    folder = tmp_path / "sweep"
    if case == "empty":
        folder.mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and str(folder) in err


def test_report_on_a_local_executor_sweep(tmp_path):
    """Two jobs through submitit's local executor (hydra/launcher=local) logged with logger=wandb
    (offline), one failing (LoRA rank 0); then ``python -m recsys.evaluation.tables`` on the sweep folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=local", "method.module.r=4,0", "backbone=tiny_encoder",
         "logger=wandb", "callbacks.rich_progress_bar=null", "trainer.limit_train_batches=2",
         "data.max_eval_users=8", "data.max_train_examples=64", "export_adapter=false",
         f"hydra.sweep.dir={sweep}", f"paths.adapter_store={tmp_path}/store"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # the failed job did not stop the other; the sweep names it and exits 1 (recsys.pipeline.sweeps)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-5000:]
    assert f"sweep {sweep}: 1 job(s) failed\n  {sweep}/1: UserError: method.module.r=0 must be >= 1" in p.stderr
    assert len([d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]) == 2  # two submitit jobs
    assert (sweep / "0" / "metrics.json").is_file()
    assert "method.module.r=0 must be >= 1" in json.loads((sweep / "1" / "failed.json").read_text())["error"]

    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "recsys.evaluation.tables", str(sweep), "--out", str(out), "--wandb", "off"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    md = (out / "report.md").read_text()
    assert "2 jobs (1 failed, 1 ok)" in md and "method.module.r=0 must be >= 1" in md
    df = pd.read_csv(out / "results.csv")
    assert set(df.row) == {"lora", "zero-shot", "random", "popularity"}
    ok = df[(df.row == "lora") & (df.variant == "method.module.r=4")].iloc[0]
    assert ok.n == 1 and not math.isnan(ok["ndcg@10_mean"])
    assert df[(df.row == "lora") & (df.variant == "method.module.r=0")].iloc[0].failed == 1
    assert (out / "plots" / "bars_synthetic_tools.png").is_file()  # data identity: collection/target
