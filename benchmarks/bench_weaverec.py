"""Part 6: WeaveRec's weave-training step against N+1 LoRA steps, and merged-adapter inference against one LoRA
(``--parts weaverec``, a mixin of ``bench.Bench``)."""

from __future__ import annotations

import copy
from functools import partial

import torch

from bench_tools import (DirectTrainer, alternate, direct, eval_mode, infer_step, make_optimizer, per_step,
    random_lora_b, round_ratios, span, verdict)


class WeaveRecPart:
    def part_weaverec(self):
        a = self.args
        lora = self.lora()
        lt = self.lora_direct()
        weave = {}
        try:
            from recsys.methods.weaverec import WeaveRecModule

            for N in a.weave_sources:
                torch.manual_seed(a.seed)
                m = WeaveRecModule(self.models.fresh(), target="tools", sources=[f"source{j}" for j in range(N)],
                                   r=a.r, alpha=a.alpha, dropout=a.dropout, validate_branches=False,
                                   optimizer=partial(make_optimizer, args=a, device=self.device))
                self.models.place(m)
                streams = ["target"] + [f"hybrid/source{j}" for j in range(N)]

                def batch_fn(i, streams=streams):
                    b = self.train_batch(i)
                    return {s: b for s in streams}  # every branch on the same batch: the same work as N+1 LoRA steps

                weave[N] = (m, DirectTrainer(m, a, self.device, self.total_steps(), batch_fn))
        except Exception as e:  # the module is being written by another worker: say so, measure the merge alone
            self.add("6. WeaveRec", "weave-training", f"not measured: {type(e).__name__}: {e}"[:120])
            weave = {}
        sec = "6. WeaveRec (direct calls)"
        if weave:
            variants = {f"weave{N}": partial(direct, t.step) for N, (_, t) in weave.items()}
            variants["lora"] = partial(direct, lt.step)
            tr = alternate(variants, a.steps, a.rounds, a.warmup, a.rewarm, self.meter)
            t_l = per_step(tr["lora"])
            for N in weave:
                t_w = per_step(tr[f"weave{N}"])
                r = t_w / ((N + 1) * t_l)
                spread = round_ratios(tr[f"weave{N}"], tr["lora"], N + 1)
                self.add(sec, f"weave step, {N + 1} branches (ms) vs LoRA; ratio to {N + 1} x LoRA", 1e3 * t_w,
                         1e3 * t_l, r, "<= 1.1", verdict(r, "<=", 1.1, spread), span(spread),
                         key=f"weaverec/train_ratio_{N + 1}_branches")
                self.figures[f"weaverec/train_step_s_{N + 1}_branches"] = t_w
            self.figures["weaverec/lora_train_step_s"] = t_l

        # merged inference: merge_adapters of k random adapters, the dense fold of the largest, the modules' own
        from peft import get_peft_model

        from recsys.models.head import ScoringHead
        from recsys.models.merging import merge_adapters
        from recsys.models.scoring import pair_scores

        k_max = max(a.merged) if a.merged else 0
        variants, labels = {}, {}

        def infer(score_fn, modules, setup=None):
            def run(first, warmup, k, block):
                with eval_mode(*modules):
                    if setup is not None:
                        setup()
                    return direct(infer_step(score_fn, a, self.test_batch), first, warmup, k, block)
            return run

        variants["lora"] = infer(lora.score, [lora])
        if k_max:
            torch.manual_seed(a.seed + 2)
            pm = get_peft_model(self.models.fresh().model, copy.deepcopy(lora.lora), adapter_name="a0")
            for j in range(1, k_max):
                pm.add_adapter(f"a{j}", copy.deepcopy(lora.lora))
            random_lora_b(pm, seed=a.seed + 2)
            for k in a.merged:
                merge_adapters(pm, [f"a{j}" for j in range(k)], "weaverec", new_name=f"merged{k}", activate=False)
            head = ScoringHead(self.models.pristine.hidden_size)
            self.models.place(pm)
            self.models.place(head)
            pm.eval()

            for k in a.merged:
                variants[f"merged{k}"] = infer(lambda b: pair_scores(pm, head, b, self.kind), [pm, head],
                                               partial(pm.base_model.set_adapter, f"merged{k}", inference_mode=True))
                labels[f"merged{k}"] = f"merge_adapters, {k} adapter{'s' if k > 1 else ''} merged (rank {k * a.r})"
            pm.base_model.set_adapter(f"merged{k_max}", inference_mode=True)
            dense = copy.deepcopy(pm).merge_and_unload(adapter_names=[f"merged{k_max}"])
            dense.eval()
            variants["dense"] = infer(lambda b: pair_scores(dense, head, b, self.kind), [dense, head])
            labels["dense"] = f"dense fold of the {k_max}-adapter merge (merge_and_unload)"
        for N, (m, _) in weave.items():
            m.ensure_merged()
            variants[f"module{N}"] = infer(m.score, [m])
            labels[f"module{N}"] = f"WeaveRecModule.score, {N + 1} branches merged"
        ev = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        e_l = per_step(ev["lora"])
        self.figures["weaverec/lora_infer_batch_s"] = e_l
        for name, label in labels.items():
            e = per_step(ev[name])
            spread = round_ratios(ev[name], ev["lora"])
            # a dense fold has no LoRA branch left: at most the LoRA model's cost; a merged adapter: the same
            target, op = ("<= 1.0", "<=") if name == "dense" else ("1.0 within noise", "~")
            self.add(sec, f"inference (ms): {label} vs LoRA", 1e3 * e, 1e3 * e_l, e / e_l, target,
                     verdict(e / e_l, op, 1.0, spread), span(spread), key=f"weaverec/infer_ratio_{name}")
            self.figures[f"weaverec/infer_batch_s_{name}"] = e
        self.free()
