"""Part 1-2 and 7: the LoRA module's training and evaluation against a plain transformers + peft loop, and the
model FLOPs (MFU) (``--parts lora``, a mixin of ``bench.Bench``)."""

from __future__ import annotations

from functools import partial

from bench_tools import (DirectTrainer, PlainLoRA, alternate, batch_lengths, copy_modes, direct, eval_mode,
    infer_step, lora_step_flops, mem_ratio, per_step, round_ratios, span, tokens, verdict)


class LoRAPart:
    def part_lora(self):
        a = self.args
        module = self.lora()
        plain = PlainLoRA(self.models.fresh(), module.lora, a, self.total_steps(), a.seed)
        plain.to(self.device, self.models.weights_dtype)
        copy_modes(module.model, plain.model)  # the module's flags: frozen backbone in eval, LoRA dropout on
        if a.harness == "trainer":
            module_train, module_eval = self._trainer_runs(module)
        else:
            dt = DirectTrainer(module, a, self.device, self.total_steps(), self.train_batch)
            module_train = partial(direct, dt.step)

            def module_eval(first, warmup, n, block):
                with eval_mode(module):
                    step = infer_step(lambda b: module.test_step(b, 0), a, self.test_batch)
                    return direct(step, first, warmup, n, block)

        def plain_train(first, warmup, n, block):
            return direct(lambda i: plain.train_step(self.train_batch(i)), first, warmup, n, block)

        def plain_eval(first, warmup, n, block):
            with eval_mode(plain.model, plain.head):
                return direct(lambda i: plain.eval_step(self.test_batch(i)), first, warmup, n, block)

        # same initial weights: the first losses agree (up to LoRA dropout's random draws)
        tr = alternate({"module": module_train, "plain": plain_train}, a.steps, a.rounds, a.warmup, a.rewarm,
                       self.meter)
        ev = alternate({"module": module_eval, "plain": plain_eval}, a.eval_steps, a.rounds, a.warmup, a.rewarm,
                       self.meter)
        self._lora_trainer = None
        self.models.place(module)  # Lightning moves the module to the CPU after fit/test

        train, test = self.batches()
        tok_step = sum(tokens(b) for b in train) / len(train)
        users_step = train[0]["labels"].numel()
        eval_users = test[0]["labels"].numel()
        t_m, t_p = per_step(tr["module"]), per_step(tr["plain"])
        spread = round_ratios(tr["plain"], tr["module"])
        sec = f"1. LoRA training ({a.harness} vs plain loop)"
        self.add(sec, "examples/s", users_step / t_m, users_step / t_p, t_p / t_m, ">= 1.0x (CPU)",
                 verdict(t_p / t_m, ">=", 1.0, spread) if self.device.type == "cpu" else None, span(spread),
                 key="lora/train_throughput_ratio")
        self.figures["lora/train_examples_per_s"] = users_step / t_m
        self.figures["plain/train_examples_per_s"] = users_step / t_p
        self.add(sec, "non-padding tokens/s", tok_step / t_m, tok_step / t_p, t_p / t_m,
                 ">= 100k tok/s (H100, 0.5B)" if self.device.type == "cuda" else "",
                 (tok_step / t_m >= 1e5) if (self.device.type == "cuda" and a.shape == "qwen2-0.5b") else None)
        self.figures["lora/train_tokens_per_s"] = tok_step / t_m
        self.figures["plain/train_tokens_per_s"] = tok_step / t_p
        self.add(sec, "step time (ms)", 1e3 * t_m, 1e3 * t_p)
        self.figures["lora/train_step_s"], self.figures["plain/train_step_s"] = t_m, t_p
        pm, pp = tr["module"]["peak"] / 2**20, tr["plain"]["peak"] / 2**20
        self.add(sec, "peak memory above weights (MiB)", pm, pp, mem_ratio(pm, pp))
        self.figures["lora/train_peak_mib"], self.figures["plain/train_peak_mib"] = pm, pp

        e_m, e_p = per_step(ev["module"]), per_step(ev["plain"])
        spread = round_ratios(ev["plain"], ev["module"])
        sec2 = "2. LoRA evaluation, 20 candidates"
        self.add(sec2, "users/s", eval_users / e_m, eval_users / e_p, e_p / e_m, ">= 1.0x (CPU)",
                 verdict(e_p / e_m, ">=", 1.0, spread) if self.device.type == "cpu" else None, span(spread),
                 key="lora/eval_throughput_ratio")
        self.figures["lora/eval_users_per_s"] = eval_users / e_m
        self.figures["plain/eval_users_per_s"] = eval_users / e_p
        pm, pp = ev["module"]["peak"] / 2**20, ev["plain"]["peak"] / 2**20
        self.add(sec2, "peak memory above weights (MiB)", pm, pp, mem_ratio(pm, pp))
        self.figures["lora/eval_peak_mib"], self.figures["plain/eval_peak_mib"] = pm, pp
        self._mfu(module, train, t_m, t_p, plain)
        del plain
        self.free()

    def _trainer_runs(self, module):
        """Block runners driving ``module`` through a lightning.Trainer (fit for training, test for evaluation)."""
        import lightning as L
        from torch.utils.data import DataLoader

        a = self.args
        precision = {"fp32": "32-true", "bf16": "bf16-mixed" if a.device == "cpu" else "bf16-true"}[a.precision]

        class Timer(L.Callback):
            def __init__(self, block, warmup, n):
                self.block, self.warmup, self.n, self.result = block, warmup, n, None

            # from the start of the first timed batch (on the device already) to the end of the last
            def _start(self, i):
                if i == self.warmup:
                    self.block.start()

            def _end(self, i):
                if i == self.warmup + self.n - 1:
                    self.result = self.block.stop(self.n)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self._start(batch_idx)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self._end(batch_idx)

            def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                self._start(batch_idx)

            def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
                self._end(batch_idx)

        def trainer(timer, **kw):
            return L.Trainer(accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, precision=precision,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             gradient_clip_val=1.0, use_distributed_sampler=False, callbacks=[timer], **kw)

        def loader(batches, first, count):
            return DataLoader([batches[(first + i) % len(batches)] for i in range(count)], batch_size=None,
                              collate_fn=lambda x: x)

        def fit(first, warmup, n, block):
            timer = Timer(block, warmup, n)
            batches = loader(self.batches()[0], first, warmup + n)
            trainer(timer, max_steps=warmup + n, max_epochs=1).fit(module, train_dataloaders=batches)
            return timer.result

        def test(first, warmup, n, block):
            timer = Timer(block, warmup, n)
            trainer(timer).test(module, dataloaders=loader(self.batches()[1], first, warmup + n), verbose=False)
            return timer.result

        return fit, test

    def _mfu(self, module, train, t_m, t_p, plain):
        a = self.args
        base = self.models.pristine.model  # the same weights, without peft's wrappers
        targets = sorted(module.lora.target_modules)
        useful = sum(lora_step_flops(base, self.kind, targets, a.r, batch_lengths(b))["total"] for b in train)
        useful /= len(train)
        padded = [lora_step_flops(base, self.kind, targets, a.r, batch_lengths(b, padded=True)) for b in train]
        padded_total = sum(p["total"] for p in padded) / len(train)
        sec = "7. Model FLOPs (LoRA step, formula in the README)"
        self.add(sec, "TFLOP a step, non-padding tokens", useful / 1e12)
        self.add(sec, "TFLOP a step, incl. padding", padded_total / 1e12)
        self.add(sec, "achieved TFLOP/s (non-padding)", useful / t_m / 1e12, useful / t_p / 1e12, t_p / t_m)
        self.figures.update({"flops/step_nonpad": useful, "flops/step_padded": padded_total,
                             "flops/parts_padded_first_batch": padded[0],
                             "lora/achieved_tflops": useful / t_m / 1e12, "plain/achieved_tflops": useful / t_p / 1e12})
        if a.peak_tflops:
            mfu_m, mfu_p = useful / t_m / (a.peak_tflops * 1e12), useful / t_p / (a.peak_tflops * 1e12)
            self.add(sec, f"MFU (of {a.peak_tflops:g} TFLOP/s)", mfu_m, mfu_p, mfu_m / mfu_p)
            self.figures["lora/mfu"], self.figures["plain/mfu"] = mfu_m, mfu_p
        if a.check_flops:  # count one plain step (eager attention: its matmuls are visible to the counter)
            from torch.utils.flop_counter import FlopCounterMode

            batch = self.train_batch(0)
            configs = [m.config for m in plain.model.modules() if hasattr(m, "config")]
            saved = [c._attn_implementation for c in configs]
            try:
                for c in configs:
                    c._attn_implementation = "eager"
                with FlopCounterMode(display=False) as counter:
                    plain.train_step(batch)
            finally:
                for c, impl in zip(configs, saved):
                    c._attn_implementation = impl
            counted = counter.get_total_flops()
            formula = lora_step_flops(base, self.kind, targets, a.r, batch_lengths(batch, padded=True))["total"]
            self.add(sec, "TFLOP: FlopCounterMode vs formula (one padded batch)", counted / 1e12, formula / 1e12,
                     counted / formula, "1.0", abs(counted / formula - 1) < 0.01, key="flops/check_ratio")
            self.figures["flops/check_counted"], self.figures["flops/check_formula_padded"] = counted, formula
