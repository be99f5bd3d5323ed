"""Results tables and plots from sweep folders: means and 95% intervals over seeds, and paired tests over
users, per target domain and setting.

    python -m recsys.evaluation.tables multirun/train/2026-01-01_10-00-00 [more folders] --out reports/main
    python report.py multirun/train/* --out reports/all --metric hr@10 --wandb on

Reads every job folder under the given folders (``.hydra/config.yaml`` and ``metrics.json``, or
``failed.json``; a job with neither is *incomplete*: killed, or still running). A group is a target
domain and a setting: the source domains, the target fraction and the backbone. Per group, one row
per method (and per hyper-parameter variant, when a sweep varied other keys) with the test metrics'
mean and 95% t interval over seeds (std in the CSV), the trainable parameters and the training time; then
the zero-shot, random and popularity rows, and the full-catalogue rows of runs with eval.candidates=full.
Each method, and the zero-shot and reference rows ranked in its runs, is compared with the best method
of its group on the same users: per-user NDCG@10 from
the jobs' ``ranks.csv.gz`` (seeds both ran, averaged per user), paired bootstrap and Wilcoxon
signed-rank p-values and the rank-biserial effect size (``recsys.evaluation.significance``), in a column of the table
(``*``: p < 0.05) and a table below it. Plots draw the 95% intervals as error bars. Failed and incomplete jobs are counted in their row and listed at the end.

Writes to ``--out``: ``report.md`` (every table and the failures), ``results.csv`` (every row, mean
and std in columns), ``jobs.csv`` (one line a job, with its status and error), ``tables/<group>.md``
and ``.csv``, and ``plots/``: ``efficiency_<target>_<sources>.png`` (metric vs target fraction, a
line a method) and ``bars_<target>.png`` (methods side by side, a group of bars a setting). With
``--wandb on`` (or ``auto`` and runs that logged to wandb) the tables and plots go to a wandb run too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys.evaluation import ranks
from recsys.evaluation import significance as stats
from recsys.core.metrics import REPORT_KEYS

METRICS = REPORT_KEYS  # the tables' metrics (recsys.core.metrics)
REFERENCES = ("random", "popularity")  # rankers without a model: they depend on target, seed, candidates
# override keys that define a group or a seed, or do not change results: never part of a variant label
_NOT_VARIANT = re.compile(
    r"^(seed|method|data\.target|data\.sources|data\.target_fraction|backbone|backbone\.name|hydra\b.*|paths\b.*"
    r"|logger\b.*|callbacks\.rich_progress_bar.*|trainer\.(devices|num_nodes|accelerator|strategy.*)|task_name"
    r"|export_adapter|zero_shot|auto_resume|ckpt_path|data\.num_workers|hparams_search|debug)$"
)


@dataclass
class Job:
    """One job folder of a sweep."""

    dir: Path
    status: str  # ok | failed | incomplete
    method: str
    target: str
    sources: tuple[str, ...]
    fraction: float
    backbone: str
    seed: int | None
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    wandb_project: str | None = None
    variant: str = ""
    candidates: str = "sampled"  # data.candidates: runs on other candidate lists are never in one table

    @property
    def group(self) -> tuple:
        return self.target, self.sources, self.fraction, self.backbone, self.candidates


# ---------------------------------------------------------------------------------------------- reading
def _select(cfg, key: str, default=None):
    """The value at ``key`` with only its own leaves resolved: an interpolation that cannot be resolved
    outside the run (``${hydra:runtime.output_dir}`` of ``paths.output_dir``, ``logger.wandb.save_dir``)
    reads as None instead of failing the whole node."""
    value = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
    if isinstance(value, DictConfig):
        return {k: _select(value, str(k)) for k in value.keys()}
    if isinstance(value, ListConfig):
        return [_select(value, f"[{i}]") for i in range(len(value))]
    return value


def load_job(folder: Path) -> Job:
    """A job from its folder (``.hydra/config.yaml`` + ``metrics.json`` or ``failed.json``)."""
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    overrides: dict[str, str] = {}
    ov_file = folder / ".hydra" / "overrides.yaml"
    if ov_file.is_file():
        for item in OmegaConf.to_container(OmegaConf.load(ov_file)) or []:
            key, _, value = str(item).lstrip("+~").partition("=")
            overrides[key] = value
    status, metrics, error = "incomplete", {}, ""
    if (folder / "metrics.json").is_file():
        status, metrics = "ok", json.loads((folder / "metrics.json").read_text())
    elif (folder / "failed.json").is_file():
        failed = json.loads((folder / "failed.json").read_text())
        status, error = "failed", str(failed.get("error", "")).strip()
    seed = _select(cfg, "seed")
    project = _select(cfg, "logger.wandb.project")
    return Job(
        dir=folder, status=status, method=str(_select(cfg, "method.name", "?")),
        target=str(_select(cfg, "data.target", "?")), sources=tuple(_select(cfg, "data.sources", []) or []),
        fraction=float(_select(cfg, "data.target_fraction", 1.0) or 1.0),
        backbone=str(_select(cfg, "backbone.name", "?")), seed=int(seed) if seed is not None else None,
        overrides=overrides, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        error=error, wandb_project=str(project) if project else None,
        candidates=str(_select(cfg, "data.candidates", "sampled") or "sampled"),
    )


def find_jobs(folders: list[str | Path]) -> list[Job]:
    """Every job folder (one holding ``.hydra/config.yaml``) under ``folders``, each once, in path order."""
    found: dict[Path, Job] = {}
    for root in map(Path, folders):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such folder")
        for cfg in sorted(root.rglob(".hydra/config.yaml")):
            folder = cfg.parent.parent.resolve()
            if any(part.startswith(".") for part in folder.relative_to(root.resolve()).parts):
                continue  # .submitit/ and the like
            found.setdefault(folder, load_job(folder))
    jobs = list(found.values())
    _label_variants(jobs)
    return jobs


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


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; NaN for one value)."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def _row(group: tuple, kind: str, name: str, variant: str, runs: list[dict], prefix: str, failed: int = 0) -> dict:
    target, sources, fraction, backbone, candidates = group
    row = {"target": target, "sources": "+".join(sources), "target_fraction": fraction, "backbone": backbone,
           "candidates": candidates, "setting": setting_name(sources, fraction, backbone, candidates), "kind": kind,
           "row": name, "variant": variant,
           "n": len(runs), "seeds": " ".join(str(r["seed"]) for r in runs), "failed": failed}
    for m in METRICS:
        values = [r["metrics"].get(f"{prefix}{m}") for r in runs]
        row[f"{m}_mean"], row[f"{m}_std"] = _stats(values)
        row[f"{m}_ci"] = stats.mean_ci(values)[1]  # half-width of the 95% t interval over seeds (NaN: one seed)
    if kind == "method":
        row["params_trainable"] = _stats([r["metrics"].get("params/trainable") for r in runs])[0]
        row["train_s_mean"], row["train_s_std"] = _stats([r["metrics"].get("time/train_s") for r in runs])
    return row


def summarise(jobs: list[Job]) -> pd.DataFrame:
    """One row per (group, method + variant) and per reference row; mean/std columns per metric."""
    rows: list[dict] = []
    groups = sorted({j.group for j in jobs}, key=lambda g: (g[0], g[1], g[2], g[3], g[4]))
    for g in groups:
        in_group = [j for j in jobs if j.group == g]
        ok = [j for j in in_group if j.status == "ok"]
        methods = sorted({(j.method, j.variant) for j in in_group})
        for method, variant in methods:
            runs = [{"seed": j.seed, "metrics": j.metrics} for j in ok if (j.method, j.variant) == (method, variant)]
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
            runs = [{"seed": j.seed, "metrics": j.metrics} for j in ok
                    if (j.method, j.variant) == (method, variant) and "test/full/hr@1" in j.metrics]
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
            per_seed.setdefault(j.seed, {"seed": j.seed, "metrics": j.metrics})
    return [per_seed[s] for s in sorted(per_seed, key=str)]


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


def markdown_table(df: pd.DataFrame, paired: dict | None = None) -> str:
    """The Markdown table of one group's rows: mean [95% CI over seeds] per metric, the best method mean of
    each metric in bold; ``paired``: label -> the paired comparison with the best method (``vs best`` column)."""
    paired = paired or {}
    head = ["row", "n", *[m.upper() for m in METRICS], "trainable params", "train time (s)", "failed"]
    if paired:
        head.append(f"vs best: ΔNDCG@10, p (Wilcoxon)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    methods = df[df.kind == "method"]
    best = {m: methods[f"{m}_mean"].max() for m in METRICS} if len(methods) else {}
    for _, r in df.iterrows():
        cells = [_label(r), str(r["n"])]
        for m in METRICS:
            cell = _fmt_ci(r[f"{m}_mean"], r.get(f"{m}_ci", math.nan))
            if r["kind"] == "method" and len(methods) > 1 and r[f"{m}_mean"] == best.get(m):
                cell = f"**{cell}**"
            cells.append(cell)
        params = r.get("params_trainable", math.nan)
        cells.append("" if pd.isna(params) else f"{int(params):,}")
        train_s = _fmt(r.get("train_s_mean", math.nan), r.get("train_s_std", math.nan), 1)
        cells.append(train_s if r["kind"] == "method" else "")
        cells.append(str(r["failed"]) if r["failed"] else "")
        if paired:
            c = paired.get(_label(r)) if r["kind"] != "full" else None
            cells.append("" if c is None else ("best" if c == "best" else
                         f"{c['delta']:+.4f}, {c['p_wilcoxon']:.2g}{' *' if c['p_wilcoxon'] < 0.05 else ''}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- paired tests
def user_ndcg(job: Job, k: int = 10, split: str = "test") -> pd.Series | None:
    """Per-user NDCG@k of a job from its ranks.csv.gz (index: user), or None without a ranks file."""
    path = job.dir / ranks.FILE
    if job.status != "ok" or not path.is_file():
        return None
    df = ranks.read(path)
    df = df[df["split"] == split]
    return pd.Series(ranks.ndcg(df["rank"], k), index=df["domain"] + "/" + df["user"]) if len(df) else None


def paired_comparison(a: list[Job], b: list[Job], k: int = 10, resamples: int = 10_000,
                      split_b: str = "test") -> dict | None:
    """Paired comparison of two rows on the same users: per seed both ran, the per-user NDCG@k of each
    (same seed: same candidates); differences averaged over seeds per user, then a paired bootstrap and
    a Wilcoxon signed-rank test over users. ``split_b``: the ranks of ``b``'s jobs that row ``b`` is
    (``zero_shot/test``, ``popularity/test``: the rows a method's run also ranks). None when no seed has
    ranks for both."""
    by_seed = {j.seed: j for j in b}
    va, vb = [], []
    for ja in a:
        jb = by_seed.get(ja.seed)
        if jb is None:
            continue
        sa, sb = user_ndcg(ja, k), user_ndcg(jb, k, split_b)
        if sa is None or sb is None:
            continue
        both = sa.index.intersection(sb.index)
        va.append(sa[both])
        vb.append(sb[both])
    if not va:
        return None
    ua = pd.concat(va).groupby(level=0).mean()
    ub = pd.concat(vb).groupby(level=0).mean().reindex(ua.index)
    return {"seeds": len(va), **stats.compare_paired(ua.to_numpy(), ub.to_numpy(), resamples=resamples)}


def paired_rows(jobs: list[Job], sub: pd.DataFrame) -> tuple[dict, list[dict]]:
    """For one group: each method row, and the zero-shot and reference rows (random, popularity) of the same
    runs, compared with the best method (by NDCG@10 mean), per user.
    Returns (label -> comparison or "best", the comparisons as rows)."""
    methods = sub[sub.kind == "method"].dropna(subset=["ndcg@10_mean"])
    if len(methods) < 1 or len(sub[sub.kind.isin(["method", "zero-shot", "reference"])]) < 2:
        return {}, []
    best = methods.loc[methods["ndcg@10_mean"].idxmax()]
    key = (best["target"], best["sources"], best["target_fraction"], best["backbone"], best["candidates"])
    in_group = [j for j in jobs if j.status == "ok"
                and (j.target, "+".join(j.sources), j.fraction, j.backbone, j.candidates) == key]
    rows_of = lambda r: [j for j in in_group if (j.method, j.variant) == (r["row"], r["variant"] or "")]  # noqa: E731
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
            c = paired_comparison(rows_of(best), [j for j in in_group if j.method == method], split_b="zero_shot/test")
        if c is not None:
            out[_label(r)] = {**c, "delta": -c["delta"]}  # the row minus the best
            table.append({"a": _label(best), "b": _label(r), **c})
    return (out if len(out) > 1 else {}), table


def paired_markdown(table: list[dict]) -> str:
    head = ["best (a)", "row (b)", "users", "seeds", "NDCG@10 a", "NDCG@10 b", "Δ a−b [95% bootstrap CI]",
            "p (bootstrap)", "p (Wilcoxon)", "r (rank-biserial)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for c in table:
        lines.append(f"| {c['a']} | {c['b']} | {c['users']} | {c['seeds']} | {c['mean_a']:.4f} ± {c['se_a']:.4f} "
                     f"| {c['mean_b']:.4f} ± {c['se_b']:.4f} | {c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}] "
                     f"| {stats.format_p_bootstrap(c['p_bootstrap'])} | {c['p_wilcoxon']:.3g} ({c['wilcoxon_method']}) "
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
    for (target, sources, backbone), sub in df.groupby(["target", "sources", "backbone"], sort=True):
        lines = [(label, line, "-") for label, line in sub[sub.kind == "method"].groupby("label", sort=True)]
        if sources:
            alone = df[(df.target == target) & (df.backbone == backbone) & (df.sources == "") & (df.kind == "method")]
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
        ax.set_ylabel(f"test {metric.upper()}")
        ax.set_title(f"{target} (sources {sources or '-'}, {backbone})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
        path = out / f"efficiency_{_slug(target)}_{_slug(sources or 'none')}_{_slug(backbone)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def bar_plots(df: pd.DataFrame, out: Path, metric: str) -> list[Path]:
    """Per target: a group of bars a setting, a bar a row (methods, zero-shot, random, popularity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for target, sub in df.groupby("target", sort=True):
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
        ax.set_ylabel(f"test {metric.upper()}")
        ax.set_title(f"target {target}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
        path = out / f"bars_{_slug(target)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- report
def jobs_frame(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame([{
        "dir": str(j.dir), "status": j.status, "method": j.method, "variant": j.variant, "target": j.target,
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


def write_report(folders: list[str | Path], out: str | Path, metric: str = "ndcg@10", wandb: str = "auto") -> dict:
    """Read the sweep folders, write the report files into ``out``; returns their paths by kind."""
    if metric not in METRICS:
        raise ValueError(f"--metric {metric!r}: use one of {METRICS}")
    jobs = find_jobs(folders)
    if not jobs:
        raise FileNotFoundError(f"no job folder (.hydra/config.yaml) under {[str(f) for f in folders]}")
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    df = summarise(jobs)
    jf = jobs_frame(jobs)
    df.to_csv(out / "results.csv", index=False)
    jf.to_csv(out / "jobs.csv", index=False)

    counts = jf["status"].value_counts().to_dict()
    md = [f"# Results: {len(jobs)} jobs ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})", "",
          "Test metrics, mean [95% t interval over seeds] (n seeds; sample std in results.csv); bold: the best "
          "method; * : p < 0.05 in a paired Wilcoxon signed-rank test against the best method over users. "
          "Folders: " + ", ".join(f"`{f}`" for f in folders), ""]
    tables = []
    for (target, setting), sub in df.groupby(["target", "setting"], sort=False):
        slug = _slug(f"{target}__{setting}")
        sub.to_csv(out / "tables" / f"{slug}.csv", index=False)
        marks, comparisons = paired_rows(jobs, sub)
        table = markdown_table(sub, marks)
        if comparisons:
            table += ("\n\nPaired on the same users (per-user NDCG@10 from ranks.csv.gz, averaged over the seeds "
                      "both ran; ± standard error over users): \n\n" + paired_markdown(comparisons))
            pd.DataFrame(comparisons).to_csv(out / "tables" / f"{slug}_paired.csv", index=False)
        (out / "tables" / f"{slug}.md").write_text(f"## {target}: {setting}\n\n{table}\n")
        tables.append(out / "tables" / f"{slug}.csv")
        md += [f"## {target}: {setting}", "", table, ""]
    bad = [j for j in jobs if j.status != "ok"]
    md += [f"## Failed and incomplete jobs ({len(bad)})", ""]
    if bad:
        md += ["| job folder | status | method | target | setting | seed | error |", "|---|---|---|---|---|---|---|"]
        for j in bad:
            err = j.error.splitlines()[0] if j.error else "no metrics.json (killed, or still running)"
            err = err.replace("|", "\\|")
            md.append(f"| `{j.dir}` | {j.status} | {_label({'row': j.method, 'variant': j.variant})} | {j.target} "
                      f"| {setting_name(j.sources, j.fraction, j.backbone, j.candidates)} | {j.seed} | {err[:200]} |")
    else:
        md.append("None.")
    plots = efficiency_plots(df, out / "plots", metric) + bar_plots(df, out / "plots", metric)
    md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n")

    result = {"markdown": out / "report.md", "csv": out / "results.csv", "jobs": out / "jobs.csv",
              "tables": tables, "plots": plots, "wandb": None}
    projects = [j.wandb_project for j in jobs if j.wandb_project]
    if wandb == "on" or (wandb == "auto" and projects):
        result["wandb"] = log_to_wandb(out, df, jf, plots, projects[0] if projects else "recsys")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m recsys.evaluation.tables", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="multirun (or run) folders; every job folder below is read")
    p.add_argument("--out", required=True, help="folder for report.md, results.csv, jobs.csv, tables/, plots/")
    p.add_argument("--metric", default="ndcg@10", choices=METRICS, help="the metric of the plots")
    p.add_argument("--wandb", default="auto", choices=("auto", "on", "off"),
                   help="log tables and plots to wandb: auto = when the runs used the wandb logger")
    args = p.parse_args(argv)
    result = write_report(args.folders, args.out, args.metric, args.wandb)
    print(Path(result["markdown"]).read_text())
    print(f"wrote {result['markdown']}, {result['csv']}, {len(result['tables'])} tables, {len(result['plots'])} plots"
          + (f"; wandb run in {result['wandb']}" if result["wandb"] else ""))
    return result


if __name__ == "__main__":
    main()
