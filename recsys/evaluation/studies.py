"""The results archive (``results/``) and the results page (``docs/results.md``) generated from it.

    python -m recsys.evaluation.studies outputs/train/2026-01-01_10-00-00 results/xcross/xcross-games-s0
    python report.py results --page docs/results.md

**Archive a run** (the first command, run from the project folder): copies a ``train.py`` or
``evaluate.py`` run folder's small result files into ``results/<study>/<run>/``:

- ``metrics.json`` and ``ranks.csv.gz`` (the per-user ranks that paired tests need), or ``failed.json``
  (its error line; no traceback);
- ``config.yaml``: the run's resolved config (Hydra's ``.hydra/config.yaml``; for ``evaluate.py
  run_dir=<run>`` the evaluated run's, whose data and seed it used); keys that resolve only inside a
  run (``${hydra:...}``) are null;
- ``overrides.yaml``: its command-line overrides.

Nothing else: no checkpoints, adapters, logs or wandb files. Every absolute path in these files is made
relative to the project folder when it lies inside it, else cut to ``<abs>/<its last name>`` (the data
root ``/data/amazon`` becomes ``<abs>/amazon``: runs are compared on its name), so no machine's path lands
in the repository. A file over 20 MB is refused.

**A study** is a folder ``results/<study>/`` (the page orders studies by their ``order``, then by folder
name) holding:

- ``study.md``: hand-written, copied into the page under the study's title: the question, the answer in
  words, what would change it;
- ``study.yaml`` (optional): the study's title, its rows and the pairs it tests::

      title: "X-Cross vs the target LoRA, three directions"
      order: 1                      # where the study stands on the page (default: after the ordered ones)
      command: "python train.py -m experiment=xcross_amazon_cpu data.target=games,toys,beauty seed=0,1,2"
      rows:                         # label: the run folders of the row (fnmatch patterns, or a list of them)
        X-Cross: "xcross-*"
        X-Cross at start: {runs: "xcross-*", split: zero_shot}   # the untrained module of the same runs
        target LoRA: "lora-*"
        popularity: {runs: "lora-*", split: popularity}         # a reference ranker, same candidates
      compare:                      # (a, b): a - b per user, per data set and pooled over data sets
        - [X-Cross, target LoRA]
        - [X-Cross, X-Cross at start]
      claims:                       # the paper's claims this study tests: the page's first table
        - claim: "X-Cross matches the target LoRA with a quarter of its added parameters (X-Cross)"
          compare: [X-Cross, target LoRA]

  A data-efficiency study names its rows by fraction (the runs named so when archived), e.g.
  ``LoRA 100%: "lora-f1.0-*"``, ``X-Cross 25%: "xcross-f0.25-*"`` and ``compare: [[X-Cross 25%, LoRA 100%]]``:
  the fraction changes only the training users, so runs of one seed rank the same candidates.
  ``claims`` (optional) puts a pair's test, pooled over the study's data sets and seeds, into the table of
  claims at the top of the page, beside the claim in words and what its 95% interval says: a better, b
  better, or a tie (the interval holds 0). The claim's words hold no measured number: those are the table's.
  ``split`` picks what a row reads of its runs: ``test`` (default: the trained model), ``zero_shot``,
  ``popularity`` or ``random`` (the ``<split>/test`` metrics and ranks). A row holds at most one run per
  data set and seed. Without ``rows``, a row per method (and variant, as ``report.py`` labels them), with
  the target fraction when it is below 1; without ``compare``, no paired tests.
- ``<run>/``: the archived runs.

**The page** opens with the claims of every study (above), then has, per study, its title and text, one
table per data set (collection/target, backbone) with a row per row label: seeds, test users, test NDCG@10 as mean ± standard error over seeds with its
95% t interval, HR@10 and MRR (mean ± standard error), the validation NDCG@10 (the value model selection
chose by), the mean training minutes and (where runs record ``train/epochs``) epochs run, failed runs;
then the paired tests of ``compare``: per-user NDCG@10 on the same candidates
(``recsys.evaluation.ranks.candidate_identity``), differences averaged over seeds per user, per data set
and pooled over all of them: mean difference with its 95% paired-bootstrap interval and p, Wilcoxon p,
rank-biserial r (``recsys.evaluation.tables.compare_groups``). The page is a function of ``results/`` alone
(sorted inputs, a seeded bootstrap, no time, no absolute path): ``tests/test_results_page.py`` checks
that the committed ``docs/results.md`` is what the command makes of the committed ``results/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import OmegaConf

from recsys.core.errors import UserError, checked
from recsys.core.files import write_json, write_text, write_with
from recsys.evaluation import ranks
from recsys.evaluation import significance as stats
from recsys.evaluation import tables

PAGE_COMMAND = "python report.py results --page docs/results.md"
ARCHIVE_COMMAND = "python -m recsys.evaluation.studies <run folder> results/<study>/<run>"
STUDY_TEXT, STUDY_CONFIG = "study.md", "study.yaml"
MAX_BYTES = 20 * 2**20  # a result file larger than this is not "small": refused
SPLITS = ("test", "zero_shot", "popularity", "random")
# an absolute path inside a text: a "/" not preceded by a name character, ".", "~", ":" or "/" (not a/b, ../a, http://)
_ABS_PATH = re.compile(r"(?<![\w.~:/$-])/[\w.@+-]+(?:/[\w.@+-]+)*/?")


# ---------------------------------------------------------------------------------------------- archive
def portable(text: str, base: Path) -> str:
    """``text`` with every absolute path made relative to ``base`` when it lies inside, else ``<abs>/<name>``."""
    def repl(m: re.Match) -> str:
        path = Path(m.group(0))
        try:
            return str(path.relative_to(base))
        except ValueError:
            return f"<abs>/{path.name}"

    return _ABS_PATH.sub(repl, text)


def _resolved(cfg) -> dict:
    """The config as plain values, each leaf resolved where it can be (``ranks.select``)."""
    return {str(k): ranks.select(cfg, str(k)) for k in cfg.keys()}


def archive(run: str | Path, dest: str | Path, base: str | Path | None = None) -> list[Path]:
    """Copy the small result files of run folder ``run`` into ``dest`` (module docstring); returns the files
    written. UserError for a folder that is not a finished run's or a file too large."""
    run, dest = Path(run), Path(dest)
    base = Path(base or Path.cwd()).resolve()
    cfg = ranks.run_config(run) if run.is_dir() else None
    if cfg is None:
        raise UserError(f"{run}: no .hydra/config.yaml: not a train.py or evaluate.py run folder")
    if not any((run / f).is_file() for f in ("metrics.json", "failed.json")):
        raise UserError(f"{run}: no metrics.json or failed.json: the run has not finished")
    for name in ("metrics.json", ranks.FILE):
        if (run / name).is_file() and (run / name).stat().st_size > MAX_BYTES:
            raise UserError(f"{run / name}: {(run / name).stat().st_size / 2**20:.0f} MB, over the archive's "
                            f"{MAX_BYTES // 2**20} MB for a result file")
    dest.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", ranks.FILE, "failed.json"):  # an archived run replaced: no file of the old one
        (dest / stale).unlink(missing_ok=True)
    text = portable(OmegaConf.to_yaml(OmegaConf.create(_resolved(cfg))), base)
    write_text(dest / "config.yaml", text)
    overrides = run / ".hydra" / "overrides.yaml"
    write_text(dest / "overrides.yaml", portable(overrides.read_text(), base) if overrides.is_file() else "[]\n")
    if (run / "metrics.json").is_file():
        write_text(dest / "metrics.json", portable((run / "metrics.json").read_text(), base))
        if (run / ranks.FILE).is_file():
            write_with(dest / ranks.FILE, lambda tmp: shutil.copyfile(run / ranks.FILE, tmp))
    else:
        error = str(json.loads((run / "failed.json").read_text()).get("error", ""))
        write_json(dest / "failed.json", {"error": portable(error, base)})
    return sorted(p for p in dest.iterdir() if p.is_file())


def archive_main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m recsys.evaluation.studies",
                                description="Copy a run's metrics.json, ranks.csv.gz and resolved config into "
                                            "results/<study>/<run>/ (no checkpoints; absolute paths removed).")
    p.add_argument("run", help="a train.py or evaluate.py run folder")
    p.add_argument("dest", help="results/<study>/<run>")
    args = p.parse_args(argv)
    try:
        written = archive(args.run, args.dest)
    except (UserError, OSError, ValueError) as e:  # a broken config or failed.json too: one line
        p.exit(2, f"error: {args.run}: {' '.join(str(e).split())}\n")
    print(f"wrote {', '.join(str(f) for f in written)}")
    return written


# ---------------------------------------------------------------------------------------------- studies
@dataclass
class StudySettings:
    """``results/<study>/study.yaml`` (module docstring)."""

    title: str | None = None
    order: int | None = None  # the study's place on the page (and in the claims table); None: after, by name
    command: str | None = None  # how the study's runs were made (an experiment preset, a script), shown on the page
    rows: dict | None = None
    compare: list | None = None
    claims: list | None = None  # [{claim: <words>, compare: [a, b]}]: the page's table of claims


@dataclass
class Row:
    label: str
    patterns: tuple[str, ...] = ()  # run folder names (fnmatch); empty: chosen by ``key``
    split: str = "test"
    key: str = ""  # without study.yaml rows: the method [variant] @fraction label the runs have

    @property
    def metric_prefix(self) -> str:
        return "test/" if self.split == "test" else f"{self.split}/test/"

    @property
    def ranks_split(self) -> str:
        return "test" if self.split == "test" else f"{self.split}/test"


@dataclass
class Study:
    folder: Path
    title: str
    text: str
    jobs: list  # tables.Job of its runs
    command: str = ""
    rows: list[Row] = field(default_factory=list)
    compare: list[tuple[str, str]] = field(default_factory=list)
    claims: list[tuple[str, str, str]] = field(default_factory=list)  # (words, a, b)
    order: int | None = None
    paired: dict = field(default_factory=dict, repr=False)  # (a, b) -> paired_scopes(a, b): computed once

    def runs(self, row: Row) -> list:
        """The jobs of ``row``: its run folders (study.yaml), or the runs of its method label."""
        if row.patterns:
            return [j for j in self.jobs if any(fnmatch.fnmatchcase(self.run_name(j), p) for p in row.patterns)]
        return [j for j in self.jobs if default_label(j) == row.key]

    def run_name(self, job) -> str:
        return job.dir.relative_to(self.folder.resolve()).parts[0]


def default_label(job) -> str:
    return job.row_label + (f" @{job.fraction:g}" if job.fraction < 1 else "")


def _row_spec(label: str, spec, where: str) -> Row:
    """A row of study.yaml: a pattern, a list of patterns, or ``{runs: ..., split: ...}``."""
    split = "test"
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"runs", "split"})
        if unknown or "runs" not in spec:
            raise UserError(f"{where}: rows.{label} needs runs: <pattern or list> (and split:), not {sorted(spec)}")
        split, spec = str(spec.get("split", "test")), spec["runs"]
    patterns = (spec,) if isinstance(spec, str) else tuple(spec) if isinstance(spec, list) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise UserError(f"{where}: rows.{label}={spec!r} must be a run folder pattern or a list of them")
    if split not in SPLITS:
        raise UserError(f"{where}: rows.{label}.split={split!r}: use one of {list(SPLITS)}")
    return Row(label, patterns, split)


def load_study(folder: Path) -> Study:
    """A study folder: its text, settings (UserError for a bad study.yaml, naming the key) and runs."""
    where = str(folder / STUDY_CONFIG)
    raw = yaml.safe_load((folder / STUDY_CONFIG).read_text()) if (folder / STUDY_CONFIG).is_file() else {}
    settings = checked(StudySettings, raw if isinstance(raw, dict) else {}, where)
    text = (folder / STUDY_TEXT).read_text().strip() if (folder / STUDY_TEXT).is_file() else ""
    jobs = tables.find_jobs([folder]) if any(p.is_dir() for p in folder.iterdir()) else []
    study = Study(folder, settings.title or folder.name, text, jobs, command=settings.command or "",
                  order=settings.order)
    if settings.rows:
        study.rows = [_row_spec(str(label), spec, where) for label, spec in settings.rows.items()]
    else:
        labels = sorted({default_label(j) for j in jobs if j.status != "unreadable"})
        study.rows = [Row(label, key=label) for label in labels]
    known = sorted(r.label for r in study.rows)
    for pair in settings.compare or []:
        study.compare.append(_pair(pair, known, f"{where}: compare entry"))
    for i, claim in enumerate(settings.claims or []):
        if not (isinstance(claim, dict) and set(claim) == {"claim", "compare"} and isinstance(claim["claim"], str)):
            raise UserError(f"{where}: claims[{i}] must be {{claim: <the claim in words>, compare: [a, b]}}, "
                            f"not {claim!r}")
        study.claims.append((claim["claim"].strip(), *_pair(claim["compare"], known, f"{where}: claims[{i}].compare")))
    return study


def _pair(pair, known: list[str], where: str) -> tuple[str, str]:
    if not (isinstance(pair, list) and len(pair) == 2 and all(str(x) in known for x in pair)):
        raise UserError(f"{where} {pair!r} must be [a, b], two row labels of {known}")
    return str(pair[0]), str(pair[1])


def data_sets(study: Study) -> list[tuple]:
    """The data sets of a study's readable runs: (collection, target, backbone, candidates), sorted."""
    return sorted({_data_key(j) for j in study.jobs if j.status != "unreadable"}, key=str)


def _data_key(job) -> tuple:
    return job.collection, job.target, job.backbone, job.candidates


def _data_title(key: tuple) -> str:
    collection, target, backbone, candidates = key
    return f"{tables.data_name(collection, target)} ({backbone}" + (
        ")" if candidates == "sampled" else f", {candidates} candidates)")


# ---------------------------------------------------------------------------------------------- page
def _mean_se(values: list[float]) -> str:
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if a.size == 0:
        return "—"
    return f"{a.mean():.4f}" if a.size == 1 else f"{a.mean():.4f} ± {a.std(ddof=1) / math.sqrt(a.size):.4f}"


def _interval(values: list[float]) -> str:
    mean, half = stats.mean_ci([v for v in values if v is not None])
    return "—" if math.isnan(half) else f"[{mean - half:.4f}, {mean + half:.4f}]"


def _check_one_run_per_seed(study: Study, row: Row, runs: list) -> None:
    seeds = [j.seed for j in runs]
    twice = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if twice:
        names = sorted(study.run_name(j) for j in runs if j.seed in twice)
        raise UserError(f"{study.folder / STUDY_CONFIG}: row {row.label!r} has more than one run of seed "
                        f"{twice[0]} on one data set ({', '.join(names)}): give each its own row")


def _users(job, split: str) -> int | None:
    """The users a run ranked in ``split`` (its ranks file; else its ``data/test_examples``)."""
    try:
        return int((ranks.read(job.dir)["split"] == split).sum())
    except (OSError, ValueError, EOFError):
        n = job.metrics.get("data/test_examples")
        return int(n) if n is not None else None


def row_table(study: Study, key: tuple) -> str:
    """The Markdown table of one data set of a study: a line a row label with runs on it."""
    table = [(row, [j for j in study.runs(row) if j.status != "unreadable" and _data_key(j) == key])
             for row in study.rows]
    table = [(row, runs) for row, runs in table if runs]
    # the epochs column where some run records them (train/epochs; runs archived before it was written do not)
    epochs = any("train/epochs" in j.metrics for _, runs in table for j in runs if j.status == "ok")
    head = ["row", "seeds", "users", "NDCG@10 (mean ± SE)", "NDCG@10 95% interval", "HR@10", "MRR",
            "val NDCG@10", "train min"] + (["epochs"] if epochs else []) + ["failed"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row, runs in table:
        ok = sorted((j for j in runs if j.status == "ok"), key=lambda j: str(j.seed))
        _check_one_run_per_seed(study, row, ok)
        values = {m: [j.metrics.get(f"{row.metric_prefix}{m}") for j in ok] for m in ("ndcg@10", "hr@10", "mrr")}
        users = sorted({_users(j, row.ranks_split) for j in ok} - {None})
        trained = row.split == "test"  # the other splits are reference rows or the untrained module: no training
        val = [j.metrics.get(tables.SELECT) for j in ok] if trained else []
        cells = [row.label, " ".join(str(j.seed) for j in ok) or "—", "/".join(map(str, users)) or "—",
                 _mean_se(values["ndcg@10"]), _interval(values["ndcg@10"]), _mean_se(values["hr@10"]),
                 _mean_se(values["mrr"]), _mean_se(val) if val else "",
                 _mean(ok, "time/train_s", 1 / 60, ".1f") if trained else ""]
        cells += [_mean(ok, "train/epochs", 1, ".1f") if trained else ""] if epochs else []
        cells += [str(len(runs) - len(ok)) if len(runs) > len(ok) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(jobs: list, key: str, scale: float, fmt: str) -> str:
    """The mean of metric ``key`` over ``jobs`` (times ``scale``), or "—" when none has it."""
    a = [float(j.metrics[key]) * scale for j in jobs if j.metrics.get(key) is not None]
    return format(sum(a) / len(a), fmt) if a else "—"


def paired_scopes(study: Study, a: str, b: str) -> list[tuple[str, dict | None]]:
    """The paired test of rows a and b (``tables.compare_groups``) per data set, then pooled over them when the
    study has several: [(scope title, result)], computed once a study."""
    if (a, b) not in study.paired:
        rows, keys = {r.label: r for r in study.rows}, data_sets(study)
        ra, rb = rows[a], rows[b]
        groups = {key: ([j for j in study.runs(ra) if j.status == "ok" and _data_key(j) == key],
                        [j for j in study.runs(rb) if j.status == "ok" and _data_key(j) == key]) for key in keys}
        scopes = [(_data_title(k), [g]) for k, g in groups.items() if g[0] and g[1]]
        if len(scopes) > 1:
            scopes.append(("all, pooled", [g for _, (g,) in scopes]))
        study.paired[a, b] = [(title, tables.compare_groups(gs, split_a=ra.ranks_split, split_b=rb.ranks_split))
                              for title, gs in scopes]
    return study.paired[a, b]


def _not_paired(c: dict | None) -> str:
    """Why a pair has no test ("" when it has one)."""
    return "not paired: no ranks.csv.gz" if c is None else f"not paired: {c['skipped']}" if "skipped" in c else ""


def _delta(c: dict) -> str:
    """A paired test's mean difference with its 95% bootstrap interval, and the bootstrap p: two table cells."""
    return f"{c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}] | {stats.format_p_bootstrap(c['p_bootstrap'])}"


def paired_table(study: Study) -> str:
    """The paired tests of ``study.compare``: per data set, and pooled when the study has several."""
    head = ["a", "b", "data", "seeds", "users", "NDCG@10 a", "NDCG@10 b", "Δ a−b [95% bootstrap CI]",
            "p (bootstrap)", "p (Wilcoxon)", "r"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for a, b in study.compare:
        for title, c in paired_scopes(study, a, b):
            if why := _not_paired(c):
                lines.append(f"| {a} | {b} | {title} | {why} |" + " |" * (len(head) - 4))
            else:
                lines.append(
                    f"| {a} | {b} | {title} | {c['seeds']} | {c['users']} | {c['mean_a']:.4f} ± {c['se_a']:.4f} "
                    f"| {c['mean_b']:.4f} ± {c['se_b']:.4f} | {_delta(c)} | {stats.format_p_wilcoxon(c['p_wilcoxon'])} "
                    f"| {c['rank_biserial']:+.3f} |")
    return "\n".join(lines)


def reading(a: str, b: str, c: dict) -> str:
    """What a paired test's 95% interval says: a better, b better, or a tie."""
    return f"{a} better" if c["ci_lo"] > 0 else f"{b} better" if c["ci_hi"] < 0 else "tie (the interval holds 0)"


def claims_table(studies: list[Study], results: str) -> list[str]:
    """The page's first section: every study's claims, each with its pair's test over all its data sets
    and seeds (the pooled scope, or the one data set); [] when no study states a claim."""
    claimed = [(s, claim) for s in studies for claim in s.claims]
    if not claimed:
        return []
    md = ["## The claims, answered", "",
          "Each claim's pair of rows, tested user by user over every data set and seed of its study (its section\n"
          "below has the tables, the text and what would change the answer); the reading is what the 95%\n"
          "paired-bootstrap interval of the NDCG@10 difference says.", "",
          "| claim | a | b | study | seeds | users | Δ NDCG@10 a−b [95% CI] | p (bootstrap) | reading |",
          "|---|---|---|---|---:|---:|---:|---:|---|"]
    for study, (words, a, b) in claimed:
        scopes = paired_scopes(study, a, b)
        c = scopes[-1][1] if scopes else None  # the pooled scope, or the one data set
        where = f"`{results}/{study.folder.name}/`"
        if why := _not_paired(c) if scopes else "no runs of both yet":
            md.append(f"| {words} | {a} | {b} | {where} | | | {why} | | |")
        else:
            md.append(f"| {words} | {a} | {b} | {where} | {c['seeds']} | {c['users']} | {_delta(c)} "
                      f"| {reading(a, b, c)} |")
    return md + [""]


def study_section(study: Study, results: str) -> list[str]:
    """A study's part of the page."""
    folder = f"{results}/{study.folder.name}"
    md = [f"## {study.title}", ""] + ([study.text, ""] if study.text else [])
    readable = [j for j in study.jobs if j.status != "unreadable"]
    failed = sum(j.status != "ok" for j in readable)
    md += [f"Runs: `{folder}/` ({len(readable)} runs" + (f", {failed} without metrics" if failed else "")
           + f"); this section: `{PAGE_COMMAND}`.", ""]
    if study.command:
        md += ["The runs were made by:", "", f"    {study.command}", ""]
    project, problems = study.folder.resolve().parent.parent, []
    for j in study.jobs:  # their errors with no machine's path (a parser names the file it read)
        if j.status != "ok":
            why = portable(j.error, project) or "no metrics.json (killed, or still running)"
            problems.append(f"- {'not read' if j.status == 'unreadable' else j.status}: "
                            f"`{folder}/{study.run_name(j)}`: {why[:300]}")
    md += problems + ([""] if problems else [])
    if not readable:
        return md + ["No runs yet.", ""]
    for key in data_sets(study):
        md += [f"### {_data_title(key)}", "", row_table(study, key), ""]
    if study.compare:
        md += ["Paired on the same users (per-user NDCG@10 on the same candidates, averaged over the seeds both "
               "rows ran; ± standard error over users):", "", paired_table(study), ""]
    return md


INTRO = f"""# Results

<!-- Generated from results/ by `{PAGE_COMMAND}`: edit results/, then run it; do not edit this page. -->

Every table here is generated by one command from the result files committed in `results/` (each run's
`metrics.json`, `ranks.csv.gz` and resolved config):

    {PAGE_COMMAND}

A run joins a study with

    {ARCHIVE_COMMAND}

A study's question and answer are in `results/<study>/study.md`, its rows and paired tests in
`results/<study>/study.yaml` (the layout is described in `recsys/evaluation/studies.py`). Test metrics are the mean over seeds ± its standard error,
with the 95% t interval of NDCG@10; val NDCG@10 is what model selection chose by; train min is the mean
training time (`time/train_s`) on the machine that ran the study (this one: 2 CPU cores, one thread a run,
two runs at a time), a cost, not a speed benchmark; epochs, where recorded, the epochs run. A paired test
compares two rows user by user on the same candidates: the mean difference of per-user NDCG@10 with its 95%
paired-bootstrap interval and p (10,000 resamples), the Wilcoxon signed-rank p and the rank-biserial r.
"""


def write_page(results: str | Path, page: str | Path) -> str:
    """The results page of the archive ``results`` (module docstring), written to ``page``; returns its text.
    FileNotFoundError for a missing archive folder."""
    results = Path(results)
    if not results.is_dir():
        raise FileNotFoundError(f"{results}: no such folder (the results archive: results/<study>/<run>/)")
    md = [INTRO]
    studies = sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not studies:
        md += [f"No studies yet: archive runs with `{ARCHIVE_COMMAND}`.", ""]
    name = results.resolve().name  # "results": the page names no machine's path
    loaded = sorted((load_study(folder) for folder in studies),  # by order, then (stable) by folder name
                    key=lambda st: (st.order is None, st.order or 0))
    md += claims_table(loaded, name)
    for study in loaded:
        md += study_section(study, name)
    text = "\n".join(md).rstrip("\n") + "\n"
    write_text(Path(page), text)
    return text


def report_main(argv: list[str] | None = None):
    """``report.py``: the report of sweep folders (``recsys.evaluation.tables``), or with ``--page PAGE`` the
    results page of a results archive."""
    p = tables.parser()
    args = p.parse_args(argv)
    if not args.page:
        return tables.report(p, args)
    if len(args.folders) != 1:
        p.error(f"--page takes one results folder: {PAGE_COMMAND}")
    try:
        write_page(args.folders[0], args.page)
    except (FileNotFoundError, UserError) as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {args.page} from {args.folders[0]}")
    return Path(args.page)


if __name__ == "__main__":
    archive_main()
