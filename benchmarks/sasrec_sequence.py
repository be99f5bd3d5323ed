"""SASRec's two ways to train (``method.module.train_on``), timed in one process on the same domain:
``last`` (every leave-one-out prefix an example, the loss at its last position) against ``sequence``
(the paper's: one window a user, the loss at every position). Both see the same transitions an epoch
(tests/test_sasrec.py); this measures what an epoch costs each and prints the ratio.

Timed: a training step's forward, loss, backward and Adam step (the batches collated beforehand, so the
data loading of neither is inside), in alternating rounds; an epoch's time is the mean step time times the
epoch's batches. Validation (the same in both modes) is not timed.

    python benchmarks/sasrec_sequence.py --root ../shared/data/amazon --domain toys --threads 1
    python benchmarks/sasrec_sequence.py                     # a synthetic domain (no data needed)
    python benchmarks/sasrec_sequence.py --loss bce --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repository's recsys

from recsys.data.datamodule import RecDataModule  # noqa: E402
from recsys.methods.sasrec import TRAIN_ON, SASRecModule  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=None, help="a folder of plain-format domains (default: a synthetic domain)")
    p.add_argument("--domain", default="toys", help="the domain (under --root) or the synthetic domain's name")
    p.add_argument("--num-users", type=int, default=3000, help="synthetic: users")
    p.add_argument("--num-items", type=int, default=2000, help="synthetic: items")
    p.add_argument("--max-history", type=int, default=50, help="data.max_history (SASRec's n)")
    p.add_argument("--batch-size", type=int, default=128, help="the recipe's batch")
    p.add_argument("--loss", choices=("ce", "bce"), default="ce")
    p.add_argument("--steps", type=int, default=20, help="timed steps a mode a round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    return p.parse_args(argv)


def datamodule(args, train_on: str) -> tuple[RecDataModule, SASRecModule]:
    """The domain's training stream under ``train_on`` and a fresh module (same seed: same initial weights)."""
    if args.root:
        domains = {args.domain: {"source": "plain", "path": f"{args.root}/{args.domain}"}}
    else:
        domains = {args.domain: {"source": "synthetic", "num_users": args.num_users, "num_items": args.num_items,
                                 "min_len": 5, "max_len": 30}}
    dm = RecDataModule.from_config(domains=domains, target=args.domain, max_history=args.max_history, batch_size=args.batch_size,
                                   num_train_negatives=1 if args.loss == "bce" else 4, bucket_by_length=True,
                                   max_eval_users=10)
    dm.load_domains()
    torch.manual_seed(0)
    module = SASRecModule(num_items=dm.domains[args.domain].num_items, max_len=args.max_history,
                          loss=args.loss, train_on=train_on)
    dm.attach_ids().train_only(None, module.train_examples())
    dm.setup("fit")
    return dm, module


def step_seconds(module: SASRecModule, opt, batches: list[dict], start: int, steps: int) -> float:
    """Seconds of ``steps`` training steps over ``batches`` (cycled from ``start``)."""
    t = time.perf_counter()
    for k in range(steps):
        loss = module.objective(batches[(start + k) % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {}
    for mode in TRAIN_ON:
        dm, module = datamodule(args, mode)
        loader = dm.train_loaders()["train"]
        it = iter(loader)
        batches = [next(it) for _ in range(min(len(loader), args.steps))]
        opt = torch.optim.Adam(module.parameters(), lr=1e-3, betas=(0.9, 0.98))
        step_seconds(module.train(), opt, batches, 0, 1)  # warm-up, untimed
        runs[mode] = {"module": module, "opt": opt, "batches": batches, "epoch_batches": len(loader),
                      "examples": len(dm.train_entries["train"]), "seconds": 0.0, "steps": 0}
    for r in range(args.rounds):
        for mode, run in runs.items():
            run["seconds"] += step_seconds(run["module"], run["opt"], run["batches"], r * args.steps, args.steps)
            run["steps"] += args.steps
    figures = {}
    print(f"SASRec train_on, {args.domain} (loss {args.loss}, batch {args.batch_size}, max_history {args.max_history}, "
          f"{torch.get_num_threads()} threads)")
    for mode, run in runs.items():
        per_step = run["seconds"] / run["steps"]
        epoch_s = per_step * run["epoch_batches"]
        figures |= {f"{mode}/examples": run["examples"], f"{mode}/epoch_batches": run["epoch_batches"],
                    f"{mode}/step_s": per_step, f"{mode}/epoch_s": epoch_s, f"{mode}/epochs_per_s": 1.0 / epoch_s}
        print(f"  {mode:9s} {run['examples']:8d} examples  {run['epoch_batches']:6d} batches an epoch  "
              f"{per_step * 1e3:8.1f} ms a step  {epoch_s:8.1f} s an epoch  {1.0 / epoch_s:.4f} epochs/s")
    figures["sequence_over_last_epochs_per_s"] = figures["sequence/epochs_per_s"] / figures["last/epochs_per_s"]
    print(f"  ratio sequence / last: {figures['sequence_over_last_epochs_per_s']:.2f}x epochs/s")
    out = {"args": vars(args), "figures": figures}
    if args.json:
        from recsys.core.files import write_json

        write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
