"""Part 4 (decoders): likelihood scoring with the prompt's KV cache reused against each candidate's full prompt
(``--parts likelihood``, a mixin of ``bench.Bench``)."""

from __future__ import annotations

from functools import partial

import torch

from bench_tools import (alternate, autocast, direct, infer_step, likelihood_scores_batched, make_batches,
    mem_ratio, per_step, round_ratios, span, to_device, verdict)


class LikelihoodPart:
    def part_likelihood(self):
        from recsys.models.scoring import likelihood_scores, likelihood_scores_naive

        a = self.args
        if self.kind != "decoder":
            self.add("4. Likelihood scoring", "skipped", "encoder backbone")
            return
        _, batches = make_batches(a, self.models, likelihood=True)
        model = self.models.pristine.model
        model.eval()

        def batch_fn(i):
            return to_device(batches[i % len(batches)], self.device)

        def run(fn):
            return partial(direct, infer_step(lambda b: fn(model, b), a, batch_fn))

        variants = {"shared": run(likelihood_scores), "batched": run(likelihood_scores_batched)}
        res = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        loop = None
        if a.naive_loop_batches > 0:
            loop = alternate({"loop": run(likelihood_scores_naive), "shared": run(likelihood_scores)},
                             a.naive_loop_batches, 1, 1, 0, self.meter)
        # the three agree
        with torch.inference_mode(), autocast(a):
            b = batch_fn(0)
            s, nb = likelihood_scores(model, b), likelihood_scores_batched(model, b)
            diff = float((s - nb).abs().max())
            if loop is not None:
                diff = max(diff, float((s - likelihood_scores_naive(model, b)).abs().max()))
        users = batches[0]["prompt_ids"].size(0)
        c = batches[0]["num_candidates"]
        t_s, t_b = per_step(res["shared"]), per_step(res["batched"])
        spread = round_ratios(res["batched"], res["shared"])
        sec = f"4. Decoder likelihood scoring, {c} candidates"
        target = ">= 3x (H100, 0.5B)"
        ok = verdict(t_b / t_s, ">=", 3.0, spread) if (self.device.type == "cuda" and a.shape == "qwen2-0.5b") else None
        self.add(sec, "users/s: shared KV cache vs batched full prompts", users / t_s, users / t_b, t_b / t_s, target,
                 ok, span(spread), key="likelihood/speedup_vs_batched")
        self.figures["likelihood/shared_users_per_s"] = users / t_s
        self.figures["likelihood/batched_users_per_s"] = users / t_b
        if loop is not None:
            t_l, t_s2 = per_step(loop["loop"]), per_step(loop["shared"])
            self.add(sec, "users/s: shared KV cache vs one-at-a-time", users / t_s2, users / t_l, t_l / t_s2,
                     key="likelihood/speedup_vs_loop")
            self.figures["likelihood/loop_users_per_s"] = users / t_l
        ps, pb = res["shared"]["peak"] / 2**20, res["batched"]["peak"] / 2**20
        self.add(sec, "peak memory above weights (MiB)", ps, pb, mem_ratio(ps, pb))
        self.figures["likelihood/shared_peak_mib"], self.figures["likelihood/batched_peak_mib"] = ps, pb
        self.add(sec, "max |score difference| between the methods", diff)
        self.figures["likelihood/max_abs_diff"] = diff
        p_tok = float(batches[0]["prompt_mask"].sum(1).float().mean())
        c_tok = float(batches[0]["cont_mask"].sum(1).float().mean())
        self.add(sec, "mean prompt / continuation tokens", f"{p_tok:.0f} / {c_tok:.0f}")
        self.figures["likelihood/prompt_tokens"], self.figures["likelihood/cont_tokens"] = p_tok, c_tok
