"""WeaveRec costs (issue 5, "Performance"), measured on the same batches:

1. training: one weave step (N+1 branches, each on its own batch, one optimizer step) against N+1
   steps of N+1 separate LoRA models on the same batches (target <= 1.1x);
2. inference: the merged model against one LoRA model of the backbone (target ratio 1.0), both
   with the adapter kept separate (the merged adapter has rank (N+1) r) and folded into the
   weights (``merge_and_unload``: the same dense architecture).

    PYTHONPATH=. python benchmarks/bench_weaverec.py [--backbone embedded:minilm-l6] [--sources 2] [--reps 20]

Prints a JSON line of medians (seconds) and ratios. Timings are medians over interleaved
repetitions (the two sides alternate, so drifting machine load hits both alike).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch

from recsys.data.datamodule import RecDataModule
from recsys.methods.lora import LoRAModule
from recsys.methods.weaverec import MERGED, WeaveRecModule
from recsys.models.backbone import load_backbone

SOURCES = ["toys", "sports", "beauty"]


def synthetic_domains():
    spec = {"source": "synthetic", "num_users": 200, "num_items": 200, "seed": 0}
    return {d: dict(spec) for d in ["tools", *SOURCES]}


def batches(backbone, n_sources: int, batch_size: int):
    dm = RecDataModule(domains=synthetic_domains(), target="tools", sources=SOURCES[:n_sources], mix="hybrid",
                       batch_size=batch_size, eval_batch_size=batch_size, max_eval_users=batch_size, max_history=5)
    dm.attach(backbone.tokenizer, backbone.kind)
    dm.setup("fit")
    train = {k: next(iter(v)) for k, v in dm.train_loaders().items()}
    return train, next(iter(dm.test_dataloader()))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="embedded:minilm-l6")
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    base = load_backbone(args.backbone)
    train_batches, eval_batch = batches(base, args.sources, args.batch_size)
    weave = WeaveRecModule(copy.deepcopy(base), "tools", SOURCES[: args.sources])
    streams = [b.stream for b in weave.branches]
    loras = [LoRAModule(copy.deepcopy(base)) for _ in streams]  # one independent LoRA per branch
    opt_w = torch.optim.AdamW(weave.trainable_parameters(), lr=1e-4)
    opt_l = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) for m in loras]

    def weave_step():
        loss = weave.training_step(train_batches, 0)
        loss.backward()
        weave.configure_gradient_clipping(opt_w, 1.0, "norm")
        opt_w.step()
        opt_w.zero_grad(set_to_none=True)

    def lora_steps():
        for m, opt, s in zip(loras, opt_l, streams):
            b = train_batches[s]
            m.loss(m.score(b), b["labels"]).backward()
            torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for m in (weave, *loras):
        m.train()
    tw, tl = [], []
    for i in range(args.reps + 2):  # 2 warm-up rounds
        a, b = timed(weave_step), timed(lora_steps)
        if i >= 2:
            tw.append(a)
            tl.append(b)

    # inference: merged (unfolded, rank (N+1) r) vs one LoRA (rank r); then both folded
    weave.eval()
    single = loras[0].eval()
    with torch.no_grad():
        weave.ensure_merged()
        weave._activate(MERGED)
        ref = weave.merged_head
        mi, si = [], []
        for i in range(args.reps + 2):
            a = timed(lambda: weave._score(eval_batch, ref))
            b = timed(lambda: single.score(eval_batch))
            if i >= 2:
                mi.append(a)
                si.append(b)
        from recsys.models.scoring import pair_scores

        dense_m = copy.deepcopy(weave.model).merge_and_unload(adapter_names=[MERGED]).eval()
        dense_s = copy.deepcopy(single.model).merge_and_unload().eval()
        md, sd = [], []
        for i in range(args.reps + 2):
            a = timed(lambda: pair_scores(dense_m, ref, eval_batch, base.kind))
            b = timed(lambda: pair_scores(dense_s, single.head, eval_batch, base.kind))
            if i >= 2:
                md.append(a)
                sd.append(b)

    med = statistics.median
    out = {
        "backbone": args.backbone, "branches": len(streams), "batch_size": args.batch_size, "threads": args.threads,
        "reps": args.reps,
        "train/weave_step_s": med(tw), "train/lora_steps_s": med(tl), "train/ratio": med(tw) / med(tl),
        "infer/merged_adapter_s": med(mi), "infer/one_lora_adapter_s": med(si), "infer/ratio_adapter": med(mi) / med(si),
        "infer/merged_dense_s": med(md), "infer/one_lora_dense_s": med(sd), "infer/ratio_dense": med(md) / med(sd),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
