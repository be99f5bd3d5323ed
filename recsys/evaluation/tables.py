"""Results tables and plots from sweep folders: means and 95% intervals over seeds, and paired tests over
users, per data set and setting.

    python -m recsys.evaluation.tables multirun/train/2026-01-01_10-00-00 [more folders] --out reports/main
    python report.py multirun/train/* --out reports/all --metric hr@10 --wandb on
    python report.py results --page docs/results.md     # the results page (recsys.evaluation.studies)

Reads every job folder under the given folders (``.hydra/config.yaml``, or ``config.yaml`` of an archived
run, and ``metrics.json``, or ``failed.json``; a job with neither is *incomplete*: killed, or still
running), whatever logger the runs used: only the config keys the report needs are resolved. A folder
that cannot be read (a broken config, metrics or ranks file) is listed with its reason, one line each,
and the report goes on. A group is the data's identity (``data.collection`` and the target domain:
synthetic ``beauty`` is not Amazon ``beauty``) and a setting: the source domains, the target fraction,
the backbone and the candidates. Per group, one row per method (and per hyper-parameter variant, when a
sweep varied other keys) with the test metrics' mean and 95% t interval over seeds (std in the CSV), the
validation value of the optimised metric (``optimized_metric``, val/ndcg@10), the trainable parameters
and the training time; then the zero-shot, random and popularity rows, and the full-catalogue rows of
runs with eval.candidates=full. The best method (bold) is chosen on validation, as model selection
chooses a checkpoint; the test metrics are shown, never used to choose. Each method, and the zero-shot
and reference rows ranked in its runs, is compared with the best method on the same users: per-user
NDCG@10 from the jobs' ``ranks.csv.gz`` (the seeds both ran on the same candidates, averaged per user;
``recsys.evaluation.ranks.candidate_identity``), paired bootstrap and Wilcoxon signed-rank p-values and the
rank-biserial effect size (``recsys.evaluation.significance``), in a column of the table (``*``: p < 0.05)
and a table below it; a pair of other candidates, or of too few users, is listed as not paired with the
reason. Plots draw the 95% intervals as error bars. Failed and incomplete jobs are counted in their row
and listed at the end, and printed one line each on stderr.

Writes to ``--out``: ``report.md`` (every table and the failures), ``results.csv`` (every row, mean
and std in columns), ``jobs.csv`` (one line a job, with its status and error), ``tables/<group>.md``
and ``.csv``, and ``plots/``: ``efficiency_<data>_<sources>.png`` (metric vs target fraction, a
line a method) and ``bars_<data>.png`` (methods side by side, a group of bars a setting). With
``--wandb on`` (or ``auto`` and runs that logged to wandb) the tables and plots go to a wandb run too.
A missing folder, or one without a job folder, is a one-line error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from recsys.evaluation import ranks
from recsys.evaluation import significance as stats
from recsys.core.files import write_text, write_with
from recsys.core.metrics import REPORT_KEYS

METRICS = REPORT_KEYS  # the tables' metrics (recsys.core.metrics)
SELECT = "val/ndcg@10"  # train.yaml's optimized_metric: the best row is chosen on it (validation), never on test
REFERENCES = ("random", "popularity")  # rankers without a model: they depend on target, seed, candidates
# override keys that define a group or a seed, or do not change results: never part of a variant label
_NOT_VARIANT = re.compile(
    r"^(seed|method|data\.target|data\.sources|data\.target_fraction|backbone|backbone\.name|hydra\b.*|paths\b.*"
    r"|logger\b.*|callbacks\.rich_progress_bar.*|trainer\.(devices|num_nodes|accelerator|strategy.*)|task_name"
    r"|export_adapter|zero_shot|auto_resume|ckpt_path|data\.num_workers|hparams_search|debug)$"
)


@dataclass
class Job:
    """One job folder of a sweep (or an archived run, ``results/<study>/<run>``)."""

    dir: Path
    status: str  # ok | failed | incomplete | unreadable (its folder could not be read: ``error`` says why)
    method: str = "?"
    target: str = "?"
    sources: tuple[str, ...] = ()
    fraction: float = 1.0
    backbone: str = "?"
    seed: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    wandb_project: str | None = None
    variant: str = ""
    candidates: str = "sampled"  # data.candidates: runs on other candidate lists are never in one table
    collection: str = ""  # data.collection: with target, the data's identity (synthetic beauty is not Amazon beauty)
    select_metric: str = SELECT  # optimized_metric: the validation metric model selection (and the report) chose by
    identity: dict = field(default_factory=dict)  # ranks.candidate_identity: what fixed its test candidates

    @property
    def group(self) -> tuple:
        return self.collection, self.target, self.sources, self.fraction, self.backbone, self.candidates

    @property
    def row_label(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method


# ---------------------------------------------------------------------------------------------- reading
def _overrides(folder: Path) -> dict[str, str]:
    """``key -> value`` of the job's command-line overrides (``.hydra/overrides.yaml`` or ``overrides.yaml``)."""
    out: dict[str, str] = {}
    for path in (folder / ".hydra" / "overrides.yaml", folder / "overrides.yaml"):
        if path.is_file():
            for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
                key, _, value = str(item).lstrip("+~").partition("=")
                out[key] = value
            break
    return out


def load_job(folder: Path) -> Job:
    """A job from its folder (its config, ``metrics.json`` or ``failed.json``); only the keys the report uses
    are resolved (``${hydra:...}`` interpolations resolve only inside the run)."""
    cfg = ranks.run_config(folder)
    status, metrics, error = "incomplete", {}, ""
    if (folder / "metrics.json").is_file():
        status, metrics = "ok", json.loads((folder / "metrics.json").read_text())
    elif (folder / "failed.json").is_file():
        failed = json.loads((folder / "failed.json").read_text())
        status, error = "failed", str(failed.get("error", "")).strip()
    seed, project = ranks.select(cfg, "seed"), ranks.select(cfg, "logger.wandb.project")
    return Job(
        dir=folder, status=status, method=str(ranks.select(cfg, "method.name", "?")),
        target=str(ranks.select(cfg, "data.target", "?")), sources=tuple(ranks.select(cfg, "data.sources", []) or []),
        fraction=float(ranks.select(cfg, "data.target_fraction", 1.0) or 1.0),
        backbone=str(ranks.select(cfg, "backbone.name", "?")), seed=int(seed) if seed is not None else None,
        overrides=_overrides(folder), metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        error=error, wandb_project=str(project) if project else None,
        candidates=str(ranks.select(cfg, "data.candidates", "sampled") or "sampled"),
        collection=str(ranks.select(cfg, "data.collection", "") or ""),
        select_metric=str(ranks.select(cfg, "optimized_metric", SELECT) or SELECT),
        identity=ranks.candidate_identity(cfg),
    )


def _is_job(folder: Path) -> bool:
    """A train.py/evaluate.py job folder (``.hydra/config.yaml``) or an archived run (``config.yaml`` beside
    ``metrics.json`` or ``failed.json``; a wandb run's ``files/config.yaml`` has neither)."""
    return (folder / ".hydra" / "config.yaml").is_file() or (
        (folder / "config.yaml").is_file() and any((folder / f).is_file() for f in ("metrics.json", "failed.json")))


def find_jobs(folders: list[str | Path]) -> list[Job]:
    """Every job folder under ``folders``, each once, in path order. A folder that cannot be read (a broken
    config or metrics file) is a job of status ``unreadable`` with the reason as its error: it is listed,
    and the others are read. FileNotFoundError for a folder that does not exist."""
    found: dict[Path, Job] = {}
    for root in map(Path, folders):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        configs = sorted({*root.rglob(".hydra/config.yaml"), *root.rglob("config.yaml")})
        for folder in dict.fromkeys(c.parent.parent if c.parent.name == ".hydra" else c.parent for c in configs):
            folder = folder.resolve()
            if any(part.startswith(".") for part in folder.relative_to(root.resolve()).parts) or not _is_job(folder):
                continue  # .submitit/ and the like
            if folder not in found:
                try:
                    found[folder] = load_job(folder)
                except Exception as e:  # noqa: BLE001 - one bad folder must not stop a report over many
                    found[folder] = Job(dir=folder, status="unreadable", error=f"{type(e).__name__}: {_line(e)}")
    jobs = list(found.values())
    _label_variants([j for j in jobs if j.status != "unreadable"])
    return jobs


def _line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split())


def _label_variants(jobs: list[Job]) -> None:
    """``variant``: the overrides (other than method/target/setting/seed) whose values differ between jobs."""
    keys = {k for j in jobs for k in j.overrides if not _NOT_VARIANT.match(k)}
    varying = sorted(k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1)
    for j in jobs:
        j.variant = " ".join(f"{k}={j.overrides[k]}" for k in varying if k in j.overrides)


# ---------------------------------------------------------------------------------------------- tables
def setting_name(sources: tuple[str, ...], fraction: float, backbone: str, candidates: str = "sampled") -> str:
    name = f"sources {'+'.join(sources) or '-'}, target fraction {fraction:g}, {backbone}"
    return name if candidates == "sampled" else f"{name}, {candidates} candidates"


def data_name(collection: str, target: str) -> str:
    """The data's identity as a table names it: ``synthetic/beauty``, ``amazon/beauty``."""
    return f"{collection}/{target}" if collection else target


def group_name(group: tuple) -> str:
    """A table's title: the data's identity and the setting (``Job.group``)."""
    collection, target, sources, fraction, backbone, candidates = group
    return f"{data_name(collection, target)}: {setting_name(sources, fraction, backbone, candidates)}"


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN for one value)."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def _run(job: Job) -> dict:
    return {"seed": job.seed, "metrics": job.metrics, "select_metric": job.select_metric,
            "select": job.metrics.get(job.select_metric)}


def _row(group: tuple, kind: str, name: str, variant: str, runs: list[dict], prefix: str, failed: int = 0) -> dict:
    collection, target, sources, fraction, backbone, candidates = group
    row = {"group": group_name(group), "collection": collection, "target": target, "sources": "+".join(sources),
           "target_fraction": fraction, "backbone": backbone, "candidates": candidates,
           "setting": setting_name(sources, fraction, backbone, candidates), "kind": kind, "row": name,
           "variant": variant, "n": len(runs), "seeds": " ".join(str(r["seed"]) for r in runs), "failed": failed}
    for m in METRICS:
        values = [r["metrics"].get(f"{prefix}{m}") for r in runs]
        row[f"{m}_mean"], row[f"{m}_std"] = _stats(values)
        row[f"{m}_ci"] = stats.mean_ci(values)[1]  # half-width of the 95% t interval over seeds (NaN: one seed)
    if kind == "method":
        row["params_trainable"] = _stats([r["metrics"].get("params/trainable") for r in runs])[0]
        row["train_s_mean"], row["train_s_std"] = _stats([r["metrics"].get("time/train_s") for r in runs])
        chosen_on = {r["select_metric"] for r in runs}  # runs selected on another metric: no value to choose by
        row["select_metric"] = chosen_on.pop() if len(chosen_on) == 1 else ""
        row["select_mean"], row["select_std"] = _stats([r["select"] for r in runs]) if row["select_metric"] \
            else (math.nan, math.nan)
    return row


def summarise(jobs: list[Job]) -> pd.DataFrame:
    """One row per (group, method + variant) and per reference row; mean/std columns per metric."""
    rows: list[dict] = []
    jobs = [j for j in jobs if j.status != "unreadable"]
    for g in sorted({j.group for j in jobs}, key=str):
        in_group = [j for j in jobs if j.group == g]
        ok = [j for j in in_group if j.status == "ok"]
        methods = sorted({(j.method, j.variant) for j in in_group})
        for method, variant in methods:
            runs = [_run(j) for j in ok if (j.method, j.variant) == (method, variant)]
            failed = sum(1 for j in in_group if (j.method, j.variant) == (method, variant) and j.status != "ok")
            rows.append(_row(g, "method", method, variant, runs, "test/", failed))
        names = sorted({m for m, _ in methods})
        for method in names:  # the untrained module of each method: one value a seed
            runs = _per_seed([j for j in ok if j.method == method], "zero_shot/test/")
            if runs:
                name = "zero-shot" if len(names) == 1 else f"zero-shot ({method})"
                rows.append(_row(g, "zero-shot", name, "", runs, "zero_shot/test/"))
        for ref in REFERENCES:  # one value a seed (the same candidates for every method)
            runs = _per_seed(ok, f"{ref}/test/")
            if runs:
                rows.append(_row(g, "reference", ref, "", runs, f"{ref}/test/"))
        for method, variant in methods:  # eval.candidates=full: ranked against the whole catalogue
            runs = [_run(j) for j in ok if (j.method, j.variant) == (method, variant) and "test/full/hr@1" in j.metrics]
            if runs:
                rows.append(_row(g, "full", f"{method} (full catalogue)", variant, runs, "test/full/"))
        for ref in REFERENCES:
            runs = _per_seed(ok, f"{ref}/test/full/")
            if runs:
                rows.append(_row(g, "full", f"{ref} (full catalogue)", "", runs, f"{ref}/test/full/"))
    return pd.DataFrame(rows)


def _per_seed(jobs: list[Job], prefix: str) -> list[dict]:
    """The first job of each seed that has ``prefix`` metrics (rows that do not depend on the variant)."""
    per_seed: dict = {}
    for j in jobs:
        if f"{prefix}hr@1" in j.metrics:
            per_seed.setdefault(j.seed, _run(j))
    return [per_seed[s] for s in sorted(per_seed, key=str)]


def best_row(df: pd.DataFrame) -> pd.Series | None:
    """The method row of the best validation mean of the selection metric (``optimized_metric``, val/ndcg@10):
    chosen on validation, as model selection chooses a checkpoint; test metrics never choose. None when no
    method row has a validation value (the first row's selection metric decides which rows compete)."""
    if "select_mean" not in df:
        return None
    methods = df[(df.kind == "method") & df["select_mean"].notna()]
    if not len(methods):
        return None
    methods = methods[methods["select_metric"] == methods["select_metric"].iloc[0]]
    return methods.loc[methods["select_mean"].idxmax()]


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _fmt_ci(mean: float, half: float, digits: int = 4) -> str:
    """``mean [lo, hi]`` (the 95% t interval over seeds), or the mean alone for one seed."""
    if math.isnan(mean):
        return "—"
    if half is None or math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{mean - half:.{digits}f}, {mean + half:.{digits}f}]"


def _label(r) -> str:
    return f"{r['row']} [{r['variant']}]" if r["variant"] else str(r["row"])


def _vs_best(c) -> str:
    if c is None:
        return ""
    if c == "best":
        return "best"
    if "skipped" in c:
        return "not paired"
    return f"{c['delta']:+.4f}, {stats.format_p_wilcoxon(c['p_wilcoxon'], 2)}{' *' if c['p_wilcoxon'] < 0.05 else ''}"


def markdown_table(df: pd.DataFrame, paired: dict | None = None) -> str:
    """The Markdown table of one group's rows: mean [95% CI over seeds] per metric, the validation mean that
    chooses the best method, the best method's row in bold; ``paired``: label -> the paired comparison with
    the best method (``vs best`` column)."""
    paired = paired or {}
    best = best_row(df)
    chosen_on = best["select_metric"] if best is not None else SELECT
    head = ["row", "n", *[m.upper() for m in METRICS], f"{chosen_on} (chooses)", "trainable params",
            "train time (s)", "failed"]
    if paired:
        head.append("vs best: ΔNDCG@10, p (Wilcoxon)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for _, r in df.iterrows():
        bold = best is not None and r["kind"] == "method" and _label(r) == _label(best)
        cells = [_label(r), str(r["n"])]
        cells += [_fmt_ci(r[f"{m}_mean"], r.get(f"{m}_ci", math.nan)) for m in METRICS]
        cells.append(_fmt(r.get("select_mean", math.nan), math.nan) if r["kind"] == "method" else "")
        cells = [f"**{c}**" if bold and i >= 2 and c not in ("", "—") else c for i, c in enumerate(cells)]
        params = r.get("params_trainable", math.nan)
        cells.append("" if pd.isna(params) else f"{int(params):,}")
        train_s = _fmt(r.get("train_s_mean", math.nan), r.get("train_s_std", math.nan), 1)
        cells.append(train_s if r["kind"] == "method" else "")
        cells.append(str(r["failed"]) if r["failed"] else "")
        if paired:
            cells.append(_vs_best(paired.get(_label(r)) if r["kind"] != "full" else None))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- paired tests
def user_ndcg(job: Job, k: int = 10, split: str = "test") -> pd.Series | None:
    """Per-user NDCG@k of a job from its ranks.csv.gz (index: domain/user), or None without a ranks file;
    ValueError naming the file when it cannot be read."""
    path = job.dir / ranks.FILE
    if job.status != "ok" or not path.is_file():
        return None
    df = ranks.read(path)  # ValueError naming the file when it is no ranks file
    df = df[df["split"] == split]
    return pd.Series(ranks.ndcg(df["rank"], k), index=df["domain"] + "/" + df["user"]) if len(df) else None


def _pairs(a: list[Job], b: list[Job], k: int, split_a: str, split_b: str) -> tuple[list, list, list[str], list]:
    """Per seed both rows ran on the same candidates: their per-user NDCG@k on the users both ranked;
    why a seed could not be paired (another candidate setting, an unreadable ranks file); the seeds paired."""
    by_seed = {j.seed: j for j in b}
    va, vb, refused, seeds = [], [], [], []
    for ja in a:
        jb = by_seed.get(ja.seed)
        if jb is None:
            continue
        diff = ranks.differing_setting(ja.identity, jb.identity)
        if diff:
            refused.append(f"seed {ja.seed}: other candidates ({diff})")
            continue
        try:
            sa, sb = user_ndcg(ja, k, split_a), user_ndcg(jb, k, split_b)
        except ValueError as e:
            refused.append(str(e))
            continue
        if sa is not None and sb is not None:
            both = sa.index.intersection(sb.index)
            va.append(sa[both])
            vb.append(sb[both])
            seeds.append(ja.seed)
    return va, vb, refused, seeds


def compare_groups(groups: list[tuple[list[Job], list[Job]]], k: int = 10, resamples: int = 10_000,
                   split_a: str = "test", split_b: str = "test") -> dict | None:
    """Paired comparison of two rows on the same users, pooled over ``groups`` (per data set: the jobs of row
    a, of row b): per seed both ran on the same candidates (``ranks.candidate_identity``), the per-user
    NDCG@k of each; differences averaged over seeds per user (users of other data sets stay apart), then a
    paired bootstrap and a Wilcoxon signed-rank test over users. ``split_a``/``split_b``: the ranks each row
    is (``zero_shot/test``, ``popularity/test``: the rows a method's run also ranks). None when no seed has
    ranks for both; ``{"skipped": why}`` when seeds could not be paired or too few users were."""
    va, vb, refused, seeds = [], [], [], set()
    for i, (a, b) in enumerate(groups):  # users of one data set keyed apart from another's (same ids, other data)
        more = _pairs(a, b, k, split_a, split_b)
        va += [v.set_axis(f"{i}|" + v.index) for v in more[0]]
        vb += [v.set_axis(f"{i}|" + v.index) for v in more[1]]
        refused, seeds = refused + more[2], seeds | set(more[3])
    if not va:
        return {"skipped": "; ".join(refused)} if refused else None
    ua = pd.concat(va).groupby(level=0).mean()
    ub = pd.concat(vb).groupby(level=0).mean().reindex(ua.index)
    try:
        c = stats.compare_paired(ua.to_numpy(), ub.to_numpy(), resamples=resamples)
    except ValueError as e:
        return {"skipped": str(e)}
    return {"seeds": len(seeds), "runs": len(va), **c,
            **({"note": "; ".join(refused)} if refused else {})}


def paired_comparison(a: list[Job], b: list[Job], k: int = 10, resamples: int = 10_000,
                      split_b: str = "test") -> dict | None:
    """``compare_groups`` of one data set: row a's test ranks against row b's ``split_b`` ranks."""
    return compare_groups([(a, b)], k, resamples, "test", split_b)


def paired_rows(jobs: list[Job], sub: pd.DataFrame) -> tuple[dict, list[dict]]:
    """For one group (``jobs``: its jobs): each method row, and the zero-shot and reference rows (random,
    popularity) of the same runs, compared with the best method (``best_row``: by validation), per user.
    Returns (label -> comparison or "best", the comparisons as rows)."""
    best = best_row(sub)
    if best is None or len(sub[sub.kind.isin(["method", "zero-shot", "reference"])]) < 2:
        return {}, []
    ok = [j for j in jobs if j.status == "ok"]
    rows_of = lambda r: [j for j in ok if j.row_label == _label(r)]  # noqa: E731
    out, table = {_label(best): "best"}, []
    for _, r in sub[sub.kind.isin(["method", "zero-shot", "reference"])].iterrows():
        if _label(r) == _label(best):
            continue
        if r["kind"] == "method":
            c = paired_comparison(rows_of(best), rows_of(r))
        elif r["kind"] == "reference":  # random, popularity: ranked in the best method's own runs
            c = paired_comparison(rows_of(best), rows_of(best), split_b=f"{r['row']}/test")
        else:  # "zero-shot" or "zero-shot (<method>)": that method's untrained module
            method = best["row"] if r["row"] == "zero-shot" else r["row"][len("zero-shot ("):-1]
            c = paired_comparison(rows_of(best), [j for j in ok if j.method == method], split_b="zero_shot/test")
        if c is not None:
            out[_label(r)] = c if "skipped" in c else {**c, "delta": -c["delta"]}  # the row minus the best
            table.append({"a": _label(best), "b": _label(r), **c})
    return (out if len(out) > 1 else {}), table


def paired_markdown(table: list[dict]) -> str:
    head = ["best (a)", "row (b)", "users", "seeds", "NDCG@10 a", "NDCG@10 b", "Δ a−b [95% bootstrap CI]",
            "p (bootstrap)", "p (Wilcoxon)", "r (rank-biserial)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for c in table:
        if "skipped" in c:
            lines.append(f"| {c['a']} | {c['b']} | not paired: {c['skipped']} |" + " |" * (len(head) - 3))
            continue
        lines.append(f"| {c['a']} | {c['b']} | {c['users']} | {c['seeds']} | {c['mean_a']:.4f} ± {c['se_a']:.4f} "
                     f"| {c['mean_b']:.4f} ± {c['se_b']:.4f} | {c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}] "
                     f"| {stats.format_p_bootstrap(c['p_bootstrap'])} | {stats.format_p_wilcoxon(c['p_wilcoxon'])} ({c['wilcoxon_method']}) "
                     f"| {c['rank_biserial']:+.3f} |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


# ---------------------------------------------------------------------------------------------- plots
def efficiency_plots(df: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Metric vs target fraction, a line a method (with its variant), per target and sources. A method
    run without sources on the same target (LoRA trained on its own) is drawn in the plots of that
    target's sourced settings too, dashed, when the setting has no run of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.assign(label=df.apply(_label, axis=1) if len(df) else [])
    paths = []
    for (collection, target, sources, backbone), sub in df.groupby(["collection", "target", "sources", "backbone"],
                                                                   sort=True):
        data = data_name(collection, target)
        lines = [(label, line, "-") for label, line in sub[sub.kind == "method"].groupby("label", sort=True)]
        if sources:
            alone = df[(df.collection == collection) & (df.target == target) & (df.backbone == backbone)
                       & (df.sources == "") & (df.kind == "method")]
            lines += [(f"{label} (no sources)", line, "--") for label, line in alone.groupby("label", sort=True)
                      if label not in set(sub.label)]
        if len({f for _, line, _ in lines for f in line["target_fraction"]}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, line, style in lines:
            line = line.sort_values("target_fraction")
            y, e = line[f"{metric}_mean"].to_numpy(float), np.nan_to_num(line[f"{metric}_ci"].to_numpy(float))
            ax.errorbar(line["target_fraction"], y, yerr=e, marker="o", capsize=3, linestyle=style, label=label)
        for ref in REFERENCES:
            ref_rows = sub[sub.row == ref]
            if len(ref_rows):
                ax.axhline(ref_rows[f"{metric}_mean"].mean(), linestyle=":", linewidth=1, color="grey")
                ax.text(sub["target_fraction"].min(), ref_rows[f"{metric}_mean"].mean(), f" {ref}", va="bottom",
                        fontsize=8, color="grey")
        ax.set_xlabel("target fraction (share of the target's training users)")
        ax.grid(alpha=0.3)
        paths.append(_save_plot(fig, ax, out / f"efficiency_{_slug(data)}_{_slug(sources or 'none')}_{_slug(backbone)}.png",
                                f"{data} (sources {sources or '-'}, {backbone})", metric, -0.15))
    return paths


def bar_plots(df: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per target domain (collection and target): a group of bars a setting, a bar a row (methods, zero-shot,
    random, popularity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (collection, target), sub in df.groupby(["collection", "target"], sort=True):
        sub = sub.assign(label=sub.apply(_label, axis=1))
        settings = list(dict.fromkeys(sub.sort_values(["sources", "target_fraction", "backbone"])["setting"]))
        labels = list(dict.fromkeys(sub["label"]))
        width = 0.8 / max(1, len(labels))
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings) * max(1, len(labels)) * 0.5), 4.5))
        x = np.arange(len(settings))
        for i, label in enumerate(labels):
            rows = sub[sub.label == label].set_index("setting")
            y = [rows[f"{metric}_mean"].get(s, np.nan) for s in settings]
            e = [0.0 if pd.isna(v) else v for v in (rows[f"{metric}_ci"].get(s, np.nan) for s in settings)]
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, y, width, yerr=e, capsize=2, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([s.replace(", ", "\n") for s in settings], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        paths.append(_save_plot(fig, ax, out / f"bars_{_slug(data_name(collection, target))}.png",
                                f"target {data_name(collection, target)}", metric, -0.18))
    return paths


def _save_plot(fig, ax, path: Path, title: str, metric: str, legend_y: float) -> Path:
    """Label, title and legend ``ax`` (test ``metric`` on the y axis), write ``fig`` to ``path`` atomically
    (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(f"test {metric.upper()}")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, legend_y), ncol=2, frameon=False)
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- report
def jobs_frame(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame([{
        "dir": str(j.dir), "status": j.status, "method": j.method, "variant": j.variant, "collection": j.collection,
        "target": j.target,
        "sources": "+".join(j.sources), "target_fraction": j.fraction, "backbone": j.backbone, "seed": j.seed,
        "error": j.error.splitlines()[0] if j.error else "",
        **{f"test/{m}": j.metrics.get(f"test/{m}", math.nan) for m in METRICS},
    } for j in jobs])


def log_to_wandb(out: Path, df: pd.DataFrame, jobs: pd.DataFrame, plots: list[Path], project: str) -> str:
    """The tables and plots as a wandb run of its own (``job_type=report``); the mode from WANDB_MODE,
    offline when unset (as the wandb logger config). Returns the run's folder."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or "offline"
    run = wandb.init(project=project, job_type="report", name=f"report-{out.name}", dir=str(out), mode=mode,
                     config={"folders": sorted({str(Path(d).parent) for d in jobs["dir"]})})
    def table(frame: pd.DataFrame):  # missing values as None (wandb types a column once)
        return wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))

    run.log({"results": table(df), "jobs": table(jobs), **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    folder = run.dir
    run.finish()
    return folder


def group_tables(jobs: list[Job], df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str, list[dict]]]:
    """Per group (in ``df``'s order): its title, its rows, its Markdown table (with the paired tests below
    it) and the paired comparisons."""
    out = []
    for title, sub in (df.groupby("group", sort=False) if len(df) else []):
        in_group = [j for j in jobs if j.status != "unreadable" and group_name(j.group) == title]
        marks, comparisons = paired_rows(in_group, sub)
        table = markdown_table(sub, marks)
        if best_row(sub) is None and (sub.kind == "method").any():
            table += f"\n\nNo run has {SELECT} (validation): no best row is chosen, none is paired (test never chooses)."
        if comparisons:
            table += ("\n\nPaired on the same users (per-user NDCG@10 from ranks.csv.gz, averaged over the seeds "
                      "both ran on the same candidates; ± standard error over users): \n\n" + paired_markdown(comparisons))
        out.append((title, sub, table, comparisons))
    return out


def problems_markdown(jobs: list[Job]) -> list[str]:
    """The report's sections listing the failed and incomplete jobs and the folders that could not be read."""
    bad = [j for j in jobs if j.status in ("failed", "incomplete")]
    md = [f"## Failed and incomplete jobs ({len(bad)})", ""]
    if bad:
        md += ["| job folder | status | method | data | setting | seed | error |", "|---|---|---|---|---|---|---|"]
        for j in bad:
            err = j.error.splitlines()[0] if j.error else "no metrics.json (killed, or still running)"
            err = err.replace("|", "\\|")
            md.append(f"| `{j.dir}` | {j.status} | {j.row_label} | {data_name(j.collection, j.target)} "
                      f"| {setting_name(j.sources, j.fraction, j.backbone, j.candidates)} | {j.seed} | {err[:200]} |")
    else:
        md.append("None.")
    unreadable = [j for j in jobs if j.status == "unreadable"]
    if unreadable:
        md += ["", f"## Folders that could not be read ({len(unreadable)})", ""]
        md += [f"- `{j.dir}`: {j.error[:300]}" for j in unreadable]
    return md


def problem_lines(jobs: list[Job]) -> list[str]:
    """One line a job that gave no metrics: its status, folder and error (what the command prints)."""
    return [f"{j.status}: {j.dir}: {(j.error.splitlines() or ['no metrics.json (killed, or still running)'])[0]}"
            for j in jobs if j.status != "ok"]


def write_report(folders: list[str | Path], out: str | Path, metric: str = "ndcg@10", wandb: str = "auto") -> dict:
    """Read the sweep folders, write the report files into ``out``; returns their paths by kind and the jobs.
    FileNotFoundError for a missing folder or none holding a job folder."""
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: use one of {METRICS}")
    jobs = find_jobs(folders)
    if not jobs:
        raise FileNotFoundError(f"no job folder (.hydra/config.yaml) under {', '.join(map(str, folders))}")
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    df = summarise(jobs)
    jf = jobs_frame(jobs)
    write_with(out / "results.csv", lambda tmp: df.to_csv(tmp, index=False))
    write_with(out / "jobs.csv", lambda tmp: jf.to_csv(tmp, index=False))

    counts = jf["status"].value_counts().to_dict()
    md = [f"# Results: {len(jobs)} jobs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})", "",
          "Test metrics, mean [95% t interval over seeds] (n seeds; sample std in results.csv); bold: the best "
          f"method, chosen on validation ({SELECT} unless the runs optimised another); * : p < 0.05 in a paired "
          "Wilcoxon signed-rank test against the best method over users. "
          "Folders: " + ", ".join(f"`{f}`" for f in folders), ""]
    tables = []
    for title, sub, table, comparisons in group_tables(jobs, df):
        slug = _slug(title.replace(": ", "__"))
        write_with(out / "tables" / f"{slug}.csv", lambda tmp, sub=sub: sub.to_csv(tmp, index=False))
        if comparisons:
            frame = pd.DataFrame(comparisons)
            write_with(out / "tables" / f"{slug}_paired.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
        write_text(out / "tables" / f"{slug}.md", f"## {title}\n\n{table}\n")
        tables.append(out / "tables" / f"{slug}.csv")
        md += [f"## {title}", "", table, ""]
    md += problems_markdown(jobs)
    plots = efficiency_plots(df, out / "plots", metric) + bar_plots(df, out / "plots", metric) if len(df) else []
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    write_text(out / "report.md", "\n".join(md) + "\n")

    result = {"markdown": out / "report.md", "csv": out / "results.csv", "jobs": out / "jobs.csv",
              "tables": tables, "plots": plots, "wandb": None, "problems": problem_lines(jobs)}
    projects = [j.wandb_project for j in jobs if j.wandb_project]
    if wandb == "on" or (wandb == "auto" and projects):
        result["wandb"] = log_to_wandb(out, df, jf, plots, projects[0] if projects else "recsys")
    return result


def parser() -> argparse.ArgumentParser:
    """The report command's arguments (``report.py``; ``--page`` is ``recsys.evaluation.studies``')."""
    p = argparse.ArgumentParser(prog="python report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="multirun (or run) folders; every job folder below is read")
    p.add_argument("--out", help="folder for report.md, results.csv, jobs.csv, tables/, plots/")
    p.add_argument("--metric", default="ndcg@10", choices=METRICS, help="the metric of the plots")
    p.add_argument("--wandb", default="auto", choices=("auto", "on", "off"),
                   help="log tables and plots to wandb: auto = when the runs used the wandb logger")
    p.add_argument("--page", help="instead: the results page (docs/results.md) of a results/ archive "
                                  "(recsys.evaluation.studies)")
    return p


def report(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Write the report of ``args`` and print it; the jobs without metrics one line each on stderr; a
    missing or empty input is a one-line error (exit 2)."""
    if not args.out:
        p.error("--out is required (the folder the report goes to)")
    try:
        result = write_report(args.folders, args.out, args.metric, args.wandb)
    except FileNotFoundError as e:
        p.exit(2, f"error: {e}\n")
    print(Path(result["markdown"]).read_text())
    for line in result["problems"]:
        print(line, file=sys.stderr)
    print(f"wrote {result['markdown']}, {result['csv']}, {len(result['tables'])} tables, {len(result['plots'])} plots"
          + (f"; wandb run in {result['wandb']}" if result["wandb"] else "")
          + (f"; {len(result['problems'])} jobs without metrics (listed above)" if result["problems"] else ""))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    if args.page:
        p.error("--page is the results page: python report.py results --page docs/results.md")
    return report(p, args)


if __name__ == "__main__":
    main()
