"""Part 5: an X-Cross step / inference with n source adapters against n LoRA steps / inferences (``--parts
xcross``, a mixin of ``bench.Bench``)."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from functools import partial

import torch

from bench_tools import (Block, DirectTrainer, alternate, direct, eval_mode, infer_step, make_optimizer, mem_ratio,
    per_step, random_lora_b, round_ratios, span, verdict)


class XCrossPart:
    def source_adapters(self, n: int, folder: str) -> dict[str, str]:
        """n random LoRA adapters of the backbone in an adapter store under ``folder``: {name: path}."""
        from peft import get_peft_model

        from recsys.models.adapter_store import AdapterStore

        lora_cfg = self.lora().lora
        store = AdapterStore(folder)
        bb = self.models.fresh()
        names = [f"source{j}" for j in range(n)]
        torch.manual_seed(self.args.seed + 1)
        pm = get_peft_model(bb.model, copy.deepcopy(lora_cfg), adapter_name=names[0])
        for name in names[1:]:
            pm.add_adapter(name, copy.deepcopy(lora_cfg))
        random_lora_b(pm, seed=self.args.seed + 1)
        from recsys.models.head import ScoringHead

        head = ScoringHead(bb.hidden_size)  # a stored adapter is complete: with the head it was scored with
        out = {name: str(store.save(bb.name, name, pm, name, head, {"domain": name})) for name in names}
        del pm, bb
        return out

    def part_xcross(self):
        from recsys.methods.xcross import XCrossModule

        a = self.args
        n = a.sources
        with tempfile.TemporaryDirectory() as tmp:
            adapters = self.source_adapters(n, tmp)
            torch.manual_seed(a.seed)
            compile_integrators = {"auto": "auto", "true": True, "false": False}[a.xcross_compile]
            module = XCrossModule(self.models.fresh(), adapters, normalize=a.xcross_normalize,
                                  compile_integrators=compile_integrators,
                                  optimizer=partial(make_optimizer, args=a, device=self.device))
        self.models.place(module)
        lora = self.lora()
        xt = DirectTrainer(module, a, self.device, self.total_steps(), self.train_batch)
        lt = self.lora_direct()
        peft_routing, unfused = a.xcross_compare in ("peft", "both"), a.xcross_compare in ("unfused", "both")

        @contextlib.contextmanager
        def integrators(impl):
            """``unfused``: every integrator runs ``forward_reference`` (the unfused original) inside the block."""
            if impl == "unfused":
                for integ in module.xcross.integrators:
                    integ.forward = integ.forward_reference
            try:
                yield
            finally:
                for integ in module.xcross.integrators:
                    integ.__dict__.pop("forward", None)

        def train(impl):
            def run(first, warmup, k, block):
                with integrators(impl):
                    return direct(xt.step, first, warmup, k, block)
            return run

        variants = {"xcross": train("fused"), "lora": partial(direct, lt.step)}
        if unfused:
            variants["xcross_unfused"] = train("unfused")
        tr = alternate(variants, a.steps, a.rounds, a.warmup, a.rewarm, self.meter)

        def infer(m, routing=None, impl="fused"):
            def run(first, warmup, k, block):
                default = module.xcross.routing
                if routing:  # the same X-Cross module with the other adapter routing
                    module.xcross.routing = routing
                try:
                    with eval_mode(m), integrators(impl):
                        return direct(infer_step(m.score, a, self.test_batch), first, warmup, k, block)
                finally:
                    module.xcross.routing = default
            return run

        variants = {"xcross": infer(module), "lora": infer(lora)}
        if peft_routing:
            variants["xcross_peft"] = infer(module, "peft")
        if unfused:
            variants["xcross_unfused"] = infer(module, impl="unfused")
        ev = alternate(variants, a.eval_steps, a.rounds, a.warmup, a.rewarm, self.meter)
        sec = f"5. X-Cross, n = {n} sources, normalize={a.xcross_normalize} (direct calls)"
        for what, res, target in (("training step", tr, 1.15), ("inference batch", ev, 1.1)):
            stem = "train" if what == "training step" else "infer"
            t_x, t_l = per_step(res["xcross"]), per_step(res["lora"])
            r, spread = t_x / (n * t_l), round_ratios(res["xcross"], res["lora"], n)
            self.add(sec, f"{what} (ms): X-Cross vs LoRA; ratio to {n} x LoRA", 1e3 * t_x, 1e3 * t_l, r,
                     f"<= {target}", verdict(r, "<=", target, spread), span(spread),
                     key=f"xcross/{stem}_ratio_to_n_lora")
            self.figures[f"xcross/{stem}_ratio_to_n_lora_rounds"] = spread
            if unfused:
                t_u = per_step(res["xcross_unfused"])
                r, spread = t_u / (n * t_l), round_ratios(res["xcross_unfused"], res["lora"], n)
                self.add(sec, f"{what} (ms): X-Cross, unfused integrators, vs LoRA; ratio to {n} x LoRA", 1e3 * t_u,
                         1e3 * t_l, r, f"<= {target}", verdict(r, "<=", target, spread), span(spread),
                         key=f"xcross/{stem}_ratio_to_n_lora_unfused")
                self.figures[f"xcross/{stem}_ratio_to_n_lora_unfused_rounds"] = spread
                spread = round_ratios(res["xcross"], res["xcross_unfused"], 1)
                self.add(sec, f"{what} (ms): fused integrators (default) vs unfused", 1e3 * t_x, 1e3 * t_u, t_x / t_u,
                         "<= 1.0", verdict(t_x / t_u, "<=", 1.0, spread), span(spread),
                         key=f"xcross/{stem}_fused_over_unfused")
                self.figures[f"xcross/{stem}_fused_over_unfused_rounds"] = spread
        if unfused:  # the integrators alone, on the states they saw in one inference batch
            self._integrators_alone(sec, module, infer, per_step(ev["xcross"]), per_step(ev["xcross_unfused"]))
        e_x, e_l = per_step(ev["xcross"]), per_step(ev["lora"])
        t_x, t_l = per_step(tr["xcross"]), per_step(tr["lora"])
        e_p = None
        if peft_routing:
            e_p = per_step(ev["xcross_peft"])
            spread = round_ratios(ev["xcross"], ev["xcross_peft"], 1)
            self.add(sec, "inference batch (ms): slice routing (default) vs peft's mixed-adapter batch", 1e3 * e_x,
                     1e3 * e_p, e_x / e_p, "<= 1.0", verdict(e_x / e_p, "<=", 1.0, spread), span(spread),
                     key="xcross/infer_slice_over_peft_routing")
        px, pl = tr["xcross"]["peak"] / 2**20, tr["lora"]["peak"] / 2**20
        self.add(sec, "training peak memory above weights (MiB)", px, pl, mem_ratio(px, pl))
        self.figures.update({"xcross/train_step_s": t_x, "xcross/lora_train_step_s": t_l,
                             "xcross/infer_batch_s": e_x, "xcross/lora_infer_batch_s": e_l,
                             "xcross/infer_batch_peft_routing_s": e_p,
                             "xcross/train_peak_mib": px, "xcross/lora_train_peak_mib": pl})
        del module, xt
        self.free()

    def _integrators_alone(self, sec: str, module, infer, e_fused: float, e_unfused: float) -> None:
        """Time every layer's integrator on the (n, B, T, d) states and mask it received in one X-Cross
        inference batch (captured by forward hooks), fused against unfused, alternating; their share of
        the whole inference batch."""
        a, seen = self.args, []
        integs = list(module.xcross.integrators)
        def grab(mod, args, out):
            seen.append((mod, args[0], args[1]))

        hooks = [i.register_forward_hook(grab) for i in integs]
        try:
            infer(module)(0, 0, 1, Block(self.meter))
        finally:
            for h in hooks:
                h.remove()

        def run(impl):
            @torch.inference_mode()
            def step(i):
                for integ, h, mask in seen:
                    (integ.forward if impl == "fused" else integ.forward_reference)(h, mask)
            return partial(direct, step)

        res = alternate({"fused": run("fused"), "unfused": run("unfused")}, 4 * a.eval_steps, a.rounds, a.warmup,
                        a.rewarm, self.meter)
        t_f, t_u = per_step(res["fused"]), per_step(res["unfused"])
        spread = round_ratios(res["fused"], res["unfused"])
        self.add(sec, f"the {len(seen)} integrators alone, one inference batch's states (ms): fused vs unfused",
                 1e3 * t_f, 1e3 * t_u, t_f / t_u, "<= 1.0", verdict(t_f / t_u, "<=", 1.0, spread), span(spread),
                 key="xcross/integrators_alone_fused_over_unfused")
        self.figures["xcross/integrators_alone_fused_over_unfused_rounds"] = spread
        self.add(sec, "integrators' share of an X-Cross inference batch: fused vs unfused", t_f / e_fused,
                 t_u / e_unfused, key="xcross/integrators_share_of_inference")
        self.figures["xcross/integrators_share_of_inference_unfused"] = t_u / e_unfused
