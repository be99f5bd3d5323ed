"""Domain statistics and the reference rankers, without any model.

    python -m recsys.data.profile --root ../shared/data/amazon beauty toys games
    python -m recsys.data.profile --synthetic toys tools

Prints, per domain: load time, users, items, examples per split, and the random and popularity
rankers' test metrics on the fixed candidates (seed, num_negatives as given) — the reference rows
of every results table.
"""

from __future__ import annotations

import argparse
import time

from recsys.data.datamodule import RecDataModule
from recsys.core.metrics import REPORT_KEYS

ROWS = REPORT_KEYS  # the results tables' metrics (recsys.core.metrics)


def domain_report(domains: dict, name: str, seed: int = 0, num_negatives: int = 19, max_history: int = 10) -> dict:
    dm = RecDataModule.from_config(domains=domains, target=name, seed=seed, num_negatives=num_negatives, max_history=max_history)
    t0 = time.time()
    dm.setup("test")
    load_s = time.time() - t0
    d = dm.domains[name]
    out = {"domain": name, "setup_s": round(load_s, 2), "users": d.num_users, "items": d.num_items,
           "interactions": d.num_interactions, "train": len(dm.train_entries["train"]),
           "val": len(dm.eval_sets["val"]), "test": len(dm.eval_sets["test"])}
    for row, values in dm.reference_metrics("test").items():
        out.update({f"{row}/{k}": values[k] for k in ROWS})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("domains", nargs="+")
    ap.add_argument("--root", help="folder of plain-format domains (one sub-folder each)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic domains (default sizes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-negatives", type=int, default=19)
    ap.add_argument("--max-history", type=int, default=10)
    args = ap.parse_args(argv)
    if args.synthetic:
        specs = {n: {"source": "synthetic"} for n in args.domains}
    elif args.root:
        specs = {n: {"source": "plain", "path": f"{args.root}/{n}"} for n in args.domains}
    else:
        ap.error("give --root FOLDER or --synthetic")
    rows = [domain_report(specs, n, args.seed, args.num_negatives, args.max_history) for n in args.domains]
    cols = ["domain", "setup_s", "users", "items", "interactions", "train", "val", "test"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |")
    print()
    print("| domain | ranker | " + " | ".join(ROWS) + " |")
    print("|" + "---|" * (len(ROWS) + 2))
    for r in rows:
        for ranker in ("random", "popularity"):
            print(f"| {r['domain']} | {ranker} | " + " | ".join(f"{r[f'{ranker}/{k}']:.4f}" for k in ROWS) + " |")


if __name__ == "__main__":
    main()
