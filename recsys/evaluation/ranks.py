"""Per-user ranks of the target: ``ranks.csv.gz`` in the run folder, so that two runs on the same
candidates can be compared user by user (``recsys.evaluation.significance``, ``recsys.evaluation.tables``).

One row a (split, user): ``domain``, ``user`` (external id), ``split`` (``val``, ``test``,
``zero_shot/test``, ``test/full``...), ``target`` (external item id), ``rank`` (1-based: 1 is the
top; empty when the target is not among the candidates, e.g. missed by a retriever) and
``n_candidates``. The file is rewritten after each evaluation; the rows of a split are replaced by
its latest evaluation, except validation during training, whose rows are those of the best epoch so
far (the epoch model selection keeps).

Two rows are paired user by user only when they are evaluations of the same candidates:
``candidate_identity`` reads from a run's config what fixes them (the domain's data: collection,
target, its spec and the data root's name; the seed; the candidate settings) and ``differing_setting``
names the first that differs; ``paired`` refuses such a pair (and runs without a config beside them,
unless ``check=False``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys.core.files import write_with

FILE = "ranks.csv.gz"
COLUMNS = ("domain", "user", "split", "target", "rank", "n_candidates")
CONFIGS = (".hydra/config.yaml", "config.yaml")  # a run folder's resolved config: train.py's, or an archived copy's
# what fixes a user's candidates (recsys.data.candidates.eval_candidates: domain, user, split, seed, sampling,
# negatives; or the retriever's top K); the data root and a retriever compared by their folder's name
CANDIDATE_KEYS = ("data.collection", "data.target", "data.root", "seed", "data.num_negatives",
                  "data.candidate_sampling", "data.candidates", "data.retriever", "data.retrieve_k", "data.protocol")
VAL_KEYS = ("data.train_on_val", "data.selection_share")  # which users the val split holds


def select(cfg, key: str, default=None):
    """The value at ``key`` with only its own leaves resolved: an interpolation that cannot be resolved
    outside the run (``${hydra:runtime.output_dir}`` behind ``paths.output_dir`` or ``logger.wandb.save_dir``)
    reads as None instead of failing the whole node."""
    value = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=False)
    if isinstance(value, DictConfig):
        return {k: select(value, str(k)) for k in value.keys()}
    if isinstance(value, ListConfig):
        return [select(value, f"[{i}]") for i in range(len(value))]
    return value


def config_file(folder: str | Path) -> Path | None:
    """The resolved config of a run folder (``.hydra/config.yaml``, or ``config.yaml`` of an archived run)."""
    return next((Path(folder) / c for c in CONFIGS if (Path(folder) / c).is_file()), None)


def run_config(folder: str | Path):
    """The config of what a run folder evaluated: its own, or for an ``evaluate.py run_dir=<run>`` folder the
    evaluated run's (whose data and seed it used); None without a config, ValueError for a broken one."""
    path = config_file(folder)
    if path is None:
        return None
    cfg = _load(path)
    evaluated = select(cfg, "run_dir")
    inner = config_file(Path(str(evaluated))) if evaluated else None
    return _load(inner) if inner is not None else cfg


def _load(path: Path):
    """A config file; ValueError naming it when it is no YAML mapping."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml's and omegaconf's errors: one line naming the file
        raise ValueError(f"{path}: not a readable config ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: not a config (a YAML mapping)")
    return cfg


def candidate_identity(cfg, split: str = "test") -> dict:
    """What fixes the candidates of ``split`` in a run of config ``cfg`` (see CANDIDATE_KEYS)."""
    keys = CANDIDATE_KEYS + (VAL_KEYS if split == "val" else ())
    out = {k: select(cfg, k) for k in keys}
    for k in ("data.root", "data.retriever"):
        out[k] = Path(str(out[k])).name if out[k] else None
    target = out["data.target"]
    out[f"data.domains.{target}"] = select(cfg, f"data.domains.{target}") if target else None
    return out


def differing_setting(a: dict, b: dict) -> str | None:
    """The first setting of two ``candidate_identity`` records that differs, as ``key: a vs b``; None if none."""
    for key in dict.fromkeys([*a, *b]):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return None


class RankLog:
    """0-based ranks (float, ``inf``: target not a candidate) and candidate counts of one evaluation,
    per stage, in the order the (unshuffled) evaluation loader yields the examples: ``add`` a batch's,
    ``close`` at the end of the evaluation, ``take`` the last closed one (:func:`record`)."""

    def __init__(self):
        self.buf: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.done: dict[str, list[tuple[torch.Tensor, int]]] = {}  # stage -> its last finished evaluation's

    def add(self, stage: str, ranks: torch.Tensor, num_candidates: int) -> None:
        self.buf.setdefault(stage, []).append((ranks.detach().double().cpu(), int(num_candidates)))

    def close(self, stage: str) -> None:
        """The evaluation of ``stage`` ended: its ranks replace the previous one's until taken."""
        self.done[stage] = self.buf.pop(stage, [])

    def take(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(ranks, n_candidates) of this process's last closed evaluation of ``stage``, emptied."""
        parts = self.done.pop(stage, [])
        if not parts:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        ranks = torch.cat([r for r, _ in parts]).numpy()
        counts = np.concatenate([np.full(len(r), c, dtype=np.int64) for r, c in parts])
        return ranks, counts


def gather(ranks: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process's ranks in dataset order (the evaluation sampler gives rank r the indices r::world)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ranks, counts
    world = torch.distributed.get_world_size()
    if world == 1:
        return ranks, counts
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, (ranks, counts))
    n = sum(len(p[0]) for p in parts)
    out_r, out_c = np.empty(n), np.empty(n, dtype=np.int64)
    for r, (pr, pc) in enumerate(parts):
        out_r[r::world], out_c[r::world] = pr, pc
    return out_r, out_c


def frame(domain, examples, ranks: np.ndarray, counts: np.ndarray, split: str) -> pd.DataFrame:
    """The rows of one evaluation: ``examples`` (``Example``s of ``domain``) with their 0-based ranks."""
    if len(examples) < len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(examples)} examples of {split}")
    examples = examples[: len(ranks)]  # trainer.limit_*_batches: the loader's first examples
    rank = np.where(np.isfinite(ranks), ranks + 1, np.nan)
    return pd.DataFrame({
        "domain": domain.name, "user": [domain.user_ids[e.user] for e in examples], "split": split,
        "target": [domain.item_ids[e.target] for e in examples],
        "rank": pd.array([None if math.isnan(r) else int(r) for r in rank], dtype="Int64"), "n_candidates": counts,
    })


def write(folder: str | Path, rows: pd.DataFrame) -> Path:
    """Replace the rows of ``rows``' splits in ``<folder>/ranks.csv.gz`` (created when missing)."""
    path = Path(folder) / FILE
    if path.is_file():
        old = read(path)
        rows = pd.concat([old[~old["split"].isin(set(rows["split"]))], rows], ignore_index=True)
    return _store(path, rows)


def _store(path: Path, rows: pd.DataFrame) -> Path:
    """``rows`` as ``path`` (gzip CSV), atomically: a kill mid-write leaves the old file."""
    return write_with(path, lambda tmp: rows.to_csv(tmp, index=False, compression="gzip"))


def rename_split(folder: str | Path | None, old: str, new: str, keep: bool = False) -> None:
    """Rename the rows of split ``old`` to ``new`` in ``<folder>/ranks.csv.gz`` (e.g. the zero-shot test's);
    ``keep``: copy them instead (``old``'s rows stay)."""
    path = Path(folder) / FILE if folder is not None else None
    if path is None or not path.is_file():
        return
    rows = read(path)
    rows = rows[rows["split"] != new]
    if keep:
        rows = pd.concat([rows, rows[rows["split"] == old].assign(split=new)], ignore_index=True)
    else:
        rows.loc[rows["split"] == old, "split"] = new
    _store(path, rows)


def read(path: str | Path) -> pd.DataFrame:
    """A ranks file (or a run folder holding one), ``rank`` as nullable integers; FileNotFoundError when missing,
    ValueError naming the file when it is no ranks file (not gzip, not CSV, columns missing)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ranks file (a run from before per-user ranks has none: "
                                f"python evaluate.py run_dir=<the run folder> writes one in its own folder)")
    try:
        df = pd.read_csv(path, dtype={"user": str, "target": str, "domain": str, "split": str})
        df["rank"] = df["rank"].astype("Int64")
    except (OSError, EOFError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:  # not gzip, not CSV, ...
        raise ValueError(f"{path}: not a ranks file ({type(e).__name__}: {' '.join(str(e).split())})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a ranks file (no columns {missing})")
    return df


def ndcg(rank, k: int = 10) -> np.ndarray:
    """Per-row NDCG@k of a single relevant item from 1-based ranks (missing: 0)."""
    r = pd.array(rank, dtype="Int64").to_numpy(dtype=float, na_value=np.inf)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)


def record(module, stage: str, folder: str | Path | None) -> None:
    """After an evaluation of ``module`` (a ``RecModule``, its ``rank_log`` closed): write its ranks into
    ``folder`` (every process gathers; rank 0 writes). Validation during fit writes only an epoch that
    improves the monitored metric (the first best, as model selection)."""
    ranks, counts = gather(*module.rank_log.take(stage))
    trainer = module.trainer
    if folder is None or not trainer.is_global_zero or getattr(trainer, "sanity_checking", False):
        return
    split = stage
    if stage == "val" and trainer.state.fn == "fit":
        history = module.val_history
        now = history.get(module.current_epoch, {}).get(module.monitor, -math.inf)
        before = [v.get(module.monitor, -math.inf) for e, v in history.items() if e != module.current_epoch]
        if before and now <= max(before):
            return
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "eval_sets"):  # loaders passed by hand: no examples to name the rows
        return
    ds = dm.eval_sets["val" if stage == "val" else "test"]
    rows = [frame(dm.domains[dm.target], ds.examples, ranks, counts, split)]
    if split == "test" and len(ranks) == len(ds.examples):  # the reference rankers on the same candidates
        rows += reference_frames(dm, "test")
    write(folder, pd.concat(rows, ignore_index=True))


def reference_frames(dm, split: str) -> list[pd.DataFrame]:
    """Rows ``random/<split>`` and ``popularity/<split>``: the reference rankers' per-user ranks on the
    fixed candidates, as ``RecDataModule.reference_metrics`` scores them."""
    from recsys.core.metrics import eval_ranks, reference_scores

    ds, domain = dm.eval_sets[split], dm.domains[dm.target]
    counts = np.asarray(domain.train_item_counts())
    out = []
    for name, scores in reference_scores(ds.candidates, counts, seed=dm.seed).items():
        r = eval_ranks(torch.as_tensor(scores), torch.as_tensor(ds.target)).numpy()
        out.append(frame(domain, ds.examples, r, np.full(len(r), ds.candidates.shape[1]), f"{name}/{split}"))
    return out


def summary(df: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Per split: users, and HR@1, HR@k, NDCG@k, MRR as mean and standard error over users."""
    from recsys.evaluation.significance import standard_error

    rows = []
    for split, g in df.groupby("split", sort=True):
        r = g["rank"].to_numpy(dtype=float, na_value=np.inf)
        per_user = {"hr@1": (r <= 1).astype(float), f"hr@{k}": (r <= k).astype(float), f"ndcg@{k}": ndcg(g["rank"], k),
                    "mrr": np.where(np.isfinite(r), 1.0 / r, 0.0)}
        row = {"split": split, "users": len(g)}
        for name, v in per_user.items():
            row[name], row[f"{name}_se"] = float(v.mean()), standard_error(v)
        rows.append(row)
    return pd.DataFrame(rows)


def paired(a: str | Path, b: str | Path, split: str = "test", k: int = 10, check: bool = True) -> dict:
    """Per-user NDCG@k of two rows on the same users and targets, compared (paired bootstrap, Wilcoxon).

    ``a`` and ``b`` are run folders or ranks files, each optionally ``<path>@<split>`` (e.g.
    ``run@popularity/test``; default ``split``). A ValueError names what makes them no paired
    comparison: another candidate setting in the runs' configs (``check``: also a run without one),
    another target for a shared user, or fewer shared users than a paired test needs.
    """
    from recsys.evaluation import significance as stats

    def rows(spec) -> pd.DataFrame:
        path, _, sp = str(spec).partition("@")
        df = read(path)
        df = df[df["split"] == (sp or split)]
        if df.empty:
            raise ValueError(f"{path} has no rows of split {sp or split!r}: splits {sorted(read(path)['split'].unique())}")
        return df.set_index(df["domain"] + "/" + df["user"])

    ra, rb = rows(a), rows(b)
    if check:
        same_candidates(a, b, split)
    both = ra.index.intersection(rb.index)
    if both.empty:
        raise ValueError(f"{a} and {b} share no users: they are not evaluations of the same users")
    differ = (ra.loc[both, "target"] != rb.loc[both, "target"]).sum()
    if differ:
        raise ValueError(f"{a} and {b}: {differ} of {len(both)} shared users have another target (not the same split)")
    try:
        return stats.compare_paired(ndcg(ra.loc[both, "rank"], k), ndcg(rb.loc[both, "rank"], k))
    except ValueError as e:
        raise ValueError(f"{a} and {b}: {e}") from None


def same_candidates(a: str | Path, b: str | Path, split: str = "test") -> None:
    """ValueError unless the runs of ``a`` and ``b`` (run folders or ranks files, ``@split`` allowed) ranked
    the same candidates: the setting that differs, or the run whose config is missing."""
    identities = []
    for spec in (a, b):
        path = Path(str(spec).partition("@")[0])
        folder = path if path.is_dir() else path.parent
        cfg = run_config(folder)
        if cfg is None:
            raise ValueError(f"{folder}: no {' or '.join(CONFIGS)}, so nothing shows which candidates it ranked "
                             f"(--unchecked compares anyway)")
        identities.append(candidate_identity(cfg, split))
    diff = differing_setting(*identities)
    if diff:
        raise ValueError(f"{a} and {b} ranked other candidates ({diff}): no paired comparison")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """``python -m recsys.evaluation.ranks <run folder or ranks.csv.gz>...``: mean ± standard error over users per split;
    with ``--paired``: the first path against each other on the same users (per-user NDCG@10: the mean
    difference with its 95% paired-bootstrap interval, the bootstrap and Wilcoxon signed-rank p, the
    rank-biserial effect size); ``<path>@<split>`` picks a split (e.g. ``run@popularity/test``)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m recsys.evaluation.ranks", description=main.__doc__)
    p.add_argument("paths", nargs="+")
    p.add_argument("--paired", action="store_true", help="compare the first path with each other, user by user")
    p.add_argument("--split", default="test", help="the split compared with --paired (default test)")
    p.add_argument("--unchecked", action="store_true",
                   help="--paired without the check that both runs' configs fix the same candidates")
    args = p.parse_args(argv)
    try:
        return _main(p, args)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"error: {e}\n")


def _main(p, args) -> pd.DataFrame:
    if args.paired:
        from recsys.evaluation import significance as stats

        if len(args.paths) < 2:
            p.error("--paired needs two paths or more")
        out = []
        for other in args.paths[1:]:
            c = paired(args.paths[0], other, args.split, check=not args.unchecked)
            out.append({"a": args.paths[0], "b": other, **c})
            print(f"{args.paths[0]} vs {other}: users {c['users']}  NDCG@10 {c['mean_a']:.4f} vs {c['mean_b']:.4f}  "
                  f"a-b {c['delta']:+.4f} [{c['ci_lo']:+.4f}, {c['ci_hi']:+.4f}]  p bootstrap {stats.format_p_bootstrap(c['p_bootstrap'])}  "
                  f"p Wilcoxon {stats.format_p_wilcoxon(c['p_wilcoxon'])} ({c['wilcoxon_method']})  r {c['rank_biserial']:+.3f}")
        return pd.DataFrame(out)
    out = []
    for path in args.paths:
        s = summary(read(path))
        s.insert(0, "run", str(path))
        out.append(s)
        print(f"{path}")
        for _, r in s.iterrows():
            cells = "  ".join(f"{m} {r[m]:.4f} ± {r[m + '_se']:.4f}" for m in ("hr@1", "hr@10", "ndcg@10", "mrr"))
            print(f"  {r['split']:<24} users {r['users']:>6}  {cells}")
    return pd.concat(out, ignore_index=True)


if __name__ == "__main__":
    main()
