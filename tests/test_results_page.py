"""The results archive and page (recsys.evaluation.studies): runs copied into results/<study>/<run>/ without
checkpoints or machine paths, docs/results.md generated from results/ by one deterministic command, and the
committed page equal to what that command makes of the committed results/."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from recsys.core.errors import UserError
from recsys.evaluation import ranks, studies
from recsys.evaluation import significance as stats

REPO = Path(__file__).resolve().parents[1]
USERS = 8


def run_folder(root: Path, name: str, method: str, target: str, seed: int, shift: int = 0) -> Path:
    """A run folder as train.py leaves it (config with machine paths and a hydra interpolation, metrics,
    per-user ranks of the test, zero-shot and popularity rows, a checkpoint): user i is ranked
    1 + (i + shift) % 4 by the model, 5 by the untrained one, 3 by popularity."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    cfg = {"seed": seed, "method": {"name": method}, "backbone": {"name": "tiny:encoder"},
           "data": {"collection": "synthetic", "target": target, "sources": [], "target_fraction": 1.0,
                    "root": "/work/shared/data/synthetic", "num_negatives": 19},
           "paths": {"output_dir": "${hydra:runtime.output_dir}", "adapter_store": f"{root}/store"}}
    OmegaConf.save(OmegaConf.create(cfg), d / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"method={method}", f"seed={seed}", f"paths.adapter_store={root}/store"]),
                   d / ".hydra" / "overrides.yaml")
    model = [1 + (i + shift) % 4 for i in range(USERS)]
    rows = [pd.DataFrame({"domain": target, "user": [f"u{i}" for i in range(USERS)], "split": split,
                          "target": [f"i{i}" for i in range(USERS)], "rank": pd.array(r, dtype="Int64"),
                          "n_candidates": 20})
            for split, r in (("test", model), ("zero_shot/test", [5] * USERS), ("popularity/test", [3] * USERS))]
    ranks.write(d, pd.concat(rows, ignore_index=True))
    nd = {split: float(ranks.ndcg(pd.array(r)).mean()) for split, r in
          (("test/", model), ("zero_shot/test/", [5] * USERS), ("popularity/test/", [3] * USERS))}
    metrics = {f"{p}{m}": v for p, v in nd.items() for m in ("ndcg@10", "hr@10", "mrr")}
    metrics.update({"val/ndcg@10": nd["test/"], "data/test_examples": USERS, "time/train_s": 60.0 * (seed + 1),
                    "train/epochs": seed + 2})
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


STUDY_YAML = """title: LoRA against the untrained model and popularity
command: python train.py -m seed=0,1 backbone=tiny_encoder
rows:
  LoRA: "lora-*"
  LoRA at start: {runs: "lora-*", split: zero_shot}
  popularity: {runs: "lora-*", split: popularity}
compare:
  - [LoRA, LoRA at start]
  - [LoRA, popularity]
claims:
  - claim: "A LoRA adapter beats its untrained start"
    compare: [LoRA, LoRA at start]
  - claim: "Popularity beats a LoRA adapter"
    compare: [popularity, LoRA]
"""


def study(results: Path, runs: list[Path], name: str = "lora") -> Path:
    folder = results / name
    for run in runs:
        studies.archive(run, folder / run.name, base=run.parent)
    (folder / "study.md").write_text("Does a LoRA adapter beat its untrained start?\n")
    (folder / "study.yaml").write_text(STUDY_YAML)
    return folder


def test_archive_copies_small_files_without_machine_paths(tmp_path):
    run = run_folder(tmp_path / "multirun", "lora-tools-s0", "lora", "tools", 0)
    dest = tmp_path / "results" / "lora" / "lora-tools-s0"
    written = studies.archive(run, dest, base=tmp_path / "elsewhere")
    assert sorted(p.name for p in written) == ["config.yaml", "metrics.json", "overrides.yaml", "ranks.csv.gz"]
    text = "".join((dest / f).read_text() for f in ("config.yaml", "overrides.yaml", "metrics.json"))
    assert str(tmp_path) not in text and "/work/" not in text and "<abs>/store" in text
    assert gzip.decompress((dest / ranks.FILE).read_bytes()) == gzip.decompress((run / ranks.FILE).read_bytes())
    cfg = OmegaConf.load(dest / "config.yaml")
    assert cfg.data.root == "<abs>/synthetic" and cfg.paths.output_dir is None  # ${hydra:...}: null
    # the archived run ranked the same candidates as the original: the pair check passes on it
    assert ranks.paired(run, dest)["delta"] == 0.0
    with pytest.raises(UserError, match="no metrics.json or failed.json"):
        (run / "metrics.json").unlink()
        studies.archive(run, tmp_path / "again")


def test_archive_command_on_a_broken_run_is_one_line(tmp_path, capsys):
    run = run_folder(tmp_path, "run", "lora", "tools", 0)
    (run / ".hydra" / "config.yaml").write_text("a: [unclosed")
    with pytest.raises(SystemExit) as e:
        studies.archive_main([str(run), str(tmp_path / "results" / "s" / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a readable config" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_page_tables_and_paired_tests(tmp_path):
    """Two seeds on two data sets: a table per data set, paired tests per data set and pooled; the page is
    the same bytes when generated twice."""
    runs = [run_folder(tmp_path / "runs", f"lora-{t}-s{s}", "lora", t, s, shift=s) for t in ("tools", "toys")
            for s in (0, 1)]
    study(tmp_path / "results", runs)
    page = studies.write_page(tmp_path / "results", tmp_path / "page.md")
    assert page == studies.write_page(tmp_path / "results", tmp_path / "page2.md")
    assert "## LoRA against the untrained model and popularity" in page
    assert "Does a LoRA adapter beat its untrained start?" in page and "Runs: `results/lora/` (4 runs);" in page
    assert "    python train.py -m seed=0,1 backbone=tiny_encoder" in page
    assert "### synthetic/tools (tiny:encoder)" in page and "### synthetic/toys (tiny:encoder)" in page
    lines = page.splitlines()
    start = next(line for line in lines if line.startswith("| LoRA at start | 0 1 | 8 |"))
    assert "| 0.3869 ± 0.0000 | [0.3869, 0.3869] |" in start  # NDCG@10 of rank 5 at both seeds
    assert start.endswith("|  |  |  |  |")  # the untrained module: no val score, training time or epochs
    assert "| train min | epochs | failed |" in page
    trained = next(line for line in lines if line.startswith("| LoRA | 0 1 | 8 |"))
    assert trained.endswith("| 1.5 | 2.5 |  |")  # 60 s and 120 s of training, 2 and 3 epochs: the means
    pooled = next(line for line in lines if line.startswith("| LoRA | LoRA at start | all, pooled |"))
    # per user: the model's NDCG@10 averaged over seeds (ranks 1 + (i + s) % 4) minus rank 5's, 8 users a data
    # set, the two data sets' users kept apart (16 pairs, not 8)
    per_user = [(ranks.ndcg(pd.array([1 + i % 4])) + ranks.ndcg(pd.array([1 + (i + 1) % 4])))[0] / 2
                - ranks.ndcg(pd.array([5]))[0] for i in range(USERS)]
    c = stats.compare_paired(per_user * 2, [0.0] * 2 * USERS)
    assert "| 2 | 16 |" in pooled and f"| {c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}] |" in pooled
    assert f"| {stats.format_p_wilcoxon(c['p_wilcoxon'])} |" in pooled
    assert str(tmp_path) not in page and studies.PAGE_COMMAND in page
    # the claims table, first on the page: each claim's pair pooled over both data sets, read by its interval
    assert page.index("## The claims, answered") < page.index("## LoRA against the untrained model")
    claim = next(line for line in lines if line.startswith("| A LoRA adapter beats its untrained start |"))
    assert claim == (f"| A LoRA adapter beats its untrained start | LoRA | LoRA at start | `results/lora/` | 2 | 16 "
                     f"| {c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}] "
                     f"| {stats.format_p_bootstrap(c['p_bootstrap'])} | LoRA better |")
    against = next(line for line in lines if line.startswith("| Popularity beats a LoRA adapter |"))
    assert against.endswith("| LoRA better |")  # popularity (rank 3) - LoRA: the interval lies below 0
    assert studies.reading("a", "b", {"ci_lo": -0.01, "ci_hi": 0.02}) == "tie (the interval holds 0)"


def test_studies_stand_on_the_page_by_their_order(tmp_path):
    """``order:`` in study.yaml places a study (its section and its claims) before the unordered ones, which
    follow by folder name; a non-integer order names the key."""
    results = tmp_path / "results"
    for name, order in (("a-first-by-name", None), ("b-main", 1), ("c-second", 2), ("d-last-by-name", None)):
        (results / name).mkdir(parents=True)
        (results / name / "study.yaml").write_text(f"title: {name}\n" + (f"order: {order}\n" if order else ""))
    page = studies.write_page(results, tmp_path / "page.md")
    titles = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert titles == ["b-main", "c-second", "a-first-by-name", "d-last-by-name"]
    (results / "c-second" / "study.yaml").write_text("order: second\n")
    with pytest.raises(UserError, match=r"c-second/study.yaml.order='second' must be an integer"):
        studies.write_page(results, tmp_path / "page.md")


def test_page_of_empty_and_partial_results(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    assert "No studies yet" in studies.write_page(results, tmp_path / "page.md")
    (results / "later").mkdir()
    (results / "later" / "study.md").write_text("A question still without runs.\n")
    page = studies.write_page(results, tmp_path / "page.md")
    assert "## later" in page and "A question still without runs." in page and "No runs yet." in page
    bad = results / "later" / "broken-run"
    bad.mkdir()
    (bad / "config.yaml").write_text("a: [unclosed")
    (bad / "metrics.json").write_text("{}")
    page = studies.write_page(results, tmp_path / "page.md")
    assert "- not read: `results/later/broken-run`: ValueError: results/later/broken-run/config.yaml: not a readable config" \
        in page and str(tmp_path) not in page
    with pytest.raises(SystemExit) as e:
        studies.report_main([str(tmp_path / "missing"), "--page", str(tmp_path / "page.md")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    (results / "later" / "study.yaml").write_text("rows: {A: 'a-*'}\ncompare: [[A, B]]\n")
    with pytest.raises(UserError, match="compare entry"):
        studies.write_page(results, tmp_path / "page.md")
    (results / "later" / "study.yaml").write_text("rows: {A: 'a-*', B: 'b-*'}\nclaims: [{claim: A beats B, compare: [A, C]}]\n")
    with pytest.raises(UserError, match=r"claims\[0\]\.compare"):
        studies.write_page(results, tmp_path / "page.md")
    (results / "later" / "study.yaml").write_text("rows: {A: 'a-*', B: 'b-*'}\nclaims: [[A, B]]\n")
    with pytest.raises(UserError, match=r"claims\[0\] must be \{claim: <the claim in words>, compare: \[a, b\]\}"):
        studies.write_page(results, tmp_path / "page.md")
    (results / "later" / "study.yaml").write_text("rows: {A: 'a-*', B: 'b-*'}\nclaims: [{claim: A beats B, compare: [A, B]}]\n")
    assert "| A beats B | A | B | `results/later/` | | | no runs of both yet | | |" in studies.write_page(
        results, tmp_path / "page.md")
    (results / "later" / "study.yaml").write_text("titel: typo\n")
    with pytest.raises(UserError, match="unknown keys"):
        studies.write_page(results, tmp_path / "page.md")


def test_committed_page_is_what_the_command_makes_of_results(tmp_path):
    """docs/results.md == `python report.py results --page docs/results.md` over the committed results/."""
    made = studies.write_page(REPO / "results", tmp_path / "results.md")
    assert (REPO / "docs" / "results.md").read_text() == made, (
        f"docs/results.md is stale: run `{studies.PAGE_COMMAND}` and commit it")


@pytest.mark.slow
def test_archive_and_page_of_real_runs(tmp_path):
    """Two seeds of a tiny LoRA through train.py, archived with the command, the page made by report.py:
    no checkpoint and no machine path in results/, the pair LoRA vs its zero-shot rows from the real ranks."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "train.py", "-m", "seed=0,1", "backbone=tiny_encoder", "logger=wandb",
                    "callbacks.rich_progress_bar=null", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
                    "data.max_eval_users=8", "data.max_train_examples=64", "export_adapter=false",
                    f"hydra.sweep.dir={sweep}", f"paths.adapter_store={tmp_path}/store"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    results = tmp_path / "results"
    for seed in (0, 1):
        subprocess.run([sys.executable, "-m", "recsys.evaluation.studies", str(sweep / str(seed)),
                        str(results / "lora" / f"lora-tools-s{seed}")], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=300)
    (results / "lora" / "study.yaml").write_text(STUDY_YAML)
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert files == ["lora/lora-tools-s0/config.yaml", "lora/lora-tools-s0/metrics.json",
                     "lora/lora-tools-s0/overrides.yaml", "lora/lora-tools-s0/ranks.csv.gz",
                     "lora/lora-tools-s1/config.yaml", "lora/lora-tools-s1/metrics.json",
                     "lora/lora-tools-s1/overrides.yaml", "lora/lora-tools-s1/ranks.csv.gz", "lora/study.yaml"]
    for p in results.rglob("*.*"):
        text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
        assert str(tmp_path) not in text and "/tmp/" not in text and "/work/" not in text, p
    page = tmp_path / "results.md"
    subprocess.run([sys.executable, "report.py", str(results), "--page", str(page)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    text = page.read_text()
    assert "### synthetic/tools (tiny:encoder)" in text and "| LoRA | 0 1 | 8 |" in text
    single = ranks.paired(sweep / "0", f"{sweep / '0'}@zero_shot/test")  # one seed, the same ranks
    assert single["users"] == 8
    assert next(line for line in text.splitlines() if line.startswith("| LoRA | LoRA at start |"))
