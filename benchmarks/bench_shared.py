"""Part 3 (decoders): LoRA training with the prompt shared across candidates against the per-candidate batch
(``--parts shared``, a mixin of ``bench.Bench``)."""

from __future__ import annotations

from functools import partial

import torch

from bench_tools import (DirectTrainer, alternate, direct, make_batches, make_optimizer, mem_ratio, per_step,
    round_ratios, span, to_device, verdict)


class SharedPromptPart:
    def part_shared(self):
        from recsys.methods.lora import LoRAModule
        from recsys.models.backbone import unwrap_peft
        from recsys.models.scoring import as_pairs, likelihood_scores_per_candidate, pair_scores

        a = self.args
        sec = "3. Decoder training, prompt shared across candidates"
        if self.kind != "decoder":
            self.add(sec, "skipped", "encoder backbone")
            return
        train, _ = make_batches(a, self.models, likelihood=True)

        def batch_fn(i):
            return to_device(train[i % len(train)], self.device)

        users = train[0]["labels"].numel()
        c = train[0]["num_candidates"]
        for scoring in ("head", "likelihood"):
            trainers = {}
            # on CUDA also the shared prompt with flex_attention's sparse BlockMask (blocks no candidate sees skipped)
            variants = ("shared", "per_candidate") + (("shared_flex",) if self.device.type == "cuda" else ())
            for variant in variants:
                torch.manual_seed(a.seed)  # the same initial LoRA and head weights in both
                m = LoRAModule(self.models.fresh(), r=a.r, alpha=a.alpha, dropout=a.dropout, scoring=scoring,
                               optimizer=partial(make_optimizer, args=a, device=self.device), warmup_ratio=0.05)
                self.models.place(m)
                m.train()
                m.backbone.model.eval()  # as Lightning leaves a frozen backbone (LoRA dropout active)
                if variant == "shared_flex":
                    unwrap_peft(m.model).set_attn_implementation("flex_attention")
                score_fn = None
                if variant == "per_candidate":
                    if scoring == "head":
                        score_fn = partial(lambda mod, b: pair_scores(mod.model, mod.head, as_pairs(b), "decoder"), m)
                    else:
                        score_fn = partial(lambda mod, b: likelihood_scores_per_candidate(mod.model, b), m)
                trainers[variant] = DirectTrainer(m, a, self.device, self.total_steps(), batch_fn, score_fn)
            res = alternate({v: partial(direct, t.step) for v, t in trainers.items()}, a.steps, a.rounds, a.warmup,
                            a.rewarm, self.meter)
            t_s, t_p = per_step(res["shared"]), per_step(res["per_candidate"])
            spread = round_ratios(res["per_candidate"], res["shared"])
            target = f">= 2x (CPU, SmolLM2, {c} candidates)"
            on_target = self.device.type == "cpu" and not a.shape and a.backbone == "embedded:smollm2-135m"
            ok = verdict(t_p / t_s, ">=", 2.0, spread) if on_target else None
            self.add(sec, f"examples/s, {scoring} scoring: shared prompt vs per-candidate batch", users / t_s,
                     users / t_p, t_p / t_s, target, ok, span(spread), key=f"shared/{scoring}_train_speedup")
            if "shared_flex" in res:
                t_f = per_step(res["shared_flex"])
                spread = round_ratios(res["shared"], res["shared_flex"])
                self.add(sec, f"examples/s, {scoring}: shared prompt, flex_attention vs sdpa block mask", users / t_f,
                         users / t_s, t_s / t_f, "reported", None, span(spread), key=f"shared/{scoring}_flex_over_sdpa")
            self.figures[f"shared/{scoring}_examples_per_s"] = users / t_s
            self.figures[f"shared/{scoring}_per_candidate_examples_per_s"] = users / t_p
            ps, pp = res["shared"]["peak"] / 2**20, res["per_candidate"]["peak"] / 2**20
            self.add(sec, f"peak memory above weights (MiB), {scoring}", ps, pp, mem_ratio(ps, pp))
            self.figures[f"shared/{scoring}_peak_mib"], self.figures[f"shared/{scoring}_per_candidate_peak_mib"] = ps, pp
            del trainers
            self.free()
        p_tok = float(train[0]["prompt_mask"].sum(1).float().mean())
        c_tok = float(train[0]["cont_mask"].sum(1).float().mean())
        self.add(sec, "mean prompt / candidate tokens", f"{p_tok:.0f} / {c_tok:.0f}")
        self.figures["shared/prompt_tokens"], self.figures["shared/cont_tokens"] = p_tok, c_tok
        # tokens a step: shared P + C L against C (P + L)
        self.figures["shared/token_ratio"] = c * (p_tok + c_tok) / (p_tok + c * c_tok)
