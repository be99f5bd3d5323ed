"""Tests that exist only for CUDA (``-m gpu``; skipped without a GPU). ``benchmarks/gpu_check.sh`` runs
them first on a lent GPU: bf16-true LoRA training of an encoder and a decoder through train.py, X-Cross
and WeaveRec steps, likelihood scores on CUDA against the CPU's, shared-prompt training on CUDA (sdpa
and flex_attention) against the per-candidate batch, FSDP and DDP with one process on one GPU, and
``torch.compile`` on."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data=synthetic", "logger=none", "recipe.max_epochs=1", "trainer.limit_train_batches=6",
         "data.max_eval_users=16", "data.max_train_examples=96", "zero_shot=false", "export_adapter=false",
         "recipe.batch_size=8"]


def train(tmp_path, *args, timeout=300) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "HYDRA_FULL_ERROR": "1", "RECSYS_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", *SMALL, f"hydra.run.dir={out}",
                        f"paths.adapter_store={tmp_path / 'store'}", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"train.py {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test/ndcg@10"] <= 1
    return m


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("recsys_bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH_SMALL = ["--device", "cuda", "--precision", "bf16", "--steps", "2", "--eval-steps", "1", "--rounds", "1",
               "--warmup", "0", "--num-users", "40", "--batch-size", "4", "--eval-batch-size", "2",
               "--xcross-compile", "false"]  # compiling costs seconds: test_compiled_integrator_on_cuda_... covers it


def test_xcross_and_weaverec_steps(bench):
    """X-Cross (2 random source adapters) and WeaveRec (2 branches) training steps and inference, bf16 weights."""
    out = bench.main(["--backbone", "tiny:encoder", *BENCH_SMALL, "--parts", "xcross,weaverec",
                      "--weave-sources", "1", "--merged", "1"])
    for key in ("xcross/train_ratio_to_n_lora", "xcross/infer_ratio_to_n_lora", "weaverec/train_ratio_2_branches"):
        assert out["figures"][key] > 0, key


def test_compiled_integrator_on_cuda_equals_reference():
    """The integrators' fused step, torch.compile'd (the CUDA default, compile="auto"), against the unfused
    reference on CUDA: fp32 output and gradients within 1e-5 relative, both normalize settings."""
    from recsys.models.integrator import Integrator

    for normalize in ("layernorm", "none"):
        torch.manual_seed(0)
        integ = Integrator(2, 64, init="normal", init_std=0.3, normalize=normalize).cuda()
        assert integ.use_compile(torch.zeros(1, device="cuda"))
        h, mask = torch.randn(2, 4, 9, 64, device="cuda") + 0.5, torch.ones(4, 9, dtype=torch.long, device="cuda")
        res = []
        for fn in (integ.forward, integ.forward_reference):
            hh = h.clone().requires_grad_(True)
            integ.zero_grad(set_to_none=True)
            y = fn(hh, mask)
            (y * torch.linspace(0.5, 1.5, y.numel(), device="cuda").view_as(y)).sum().backward()
            res.append((y.detach(), integ.W_concat.weight.grad.clone(), hh.grad.clone()))
        for fused, ref in zip(*res):
            assert ((fused - ref).norm() / ref.norm()).item() < 1e-5, normalize


def test_decoder_parts_on_cuda(bench):
    out = bench.main(["--backbone", "tiny:decoder", *BENCH_SMALL, "--parts", "shared,likelihood,xcross"])
    assert out["figures"]["likelihood/max_abs_diff"] < 0.1  # bf16: shared cache, batched, one at a time
    assert out["figures"]["shared/head_train_speedup"] > 0


def _decoder_and_batch():
    from recsys.data.text import Collator, PromptTemplate, TextEncoder
    from recsys.models.backbone import load_backbone

    bb = load_backbone("tiny:decoder", hidden_size=64)
    te = TextEncoder(bb.tokenizer, "decoder", PromptTemplate(title_max_tokens=10))
    te.add_titles("d", ["red hat", "blue shoe", "green sock with stripes", "yellow scarf", "black belt",
                        "white cotton shirt", "purple dress", "orange bag"])
    items = [("d", (0,), [1, 2, 3, 4, 5], 0), ("d", (5, 6, 7, 0, 1), [2, 6, 3, 4, 7], 3)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bb.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return bb, Collator(te, likelihood=True)(items)


def test_likelihood_scores_cuda_equal_cpu():
    from recsys.models.scoring import likelihood_scores

    bb, batch = _decoder_and_batch()
    with torch.no_grad():
        cpu = likelihood_scores(bb.model, batch)
        gpu_batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        model = copy.deepcopy(bb.model).cuda()
        fp32 = likelihood_scores(model, gpu_batch).cpu()
        bf16 = likelihood_scores(model.to(torch.bfloat16), gpu_batch).cpu()
    assert cpu.std() > 1e-2
    torch.testing.assert_close(fp32, cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bf16, cpu, rtol=0.05, atol=0.1)  # bf16 weights and activations, fp32 LM head


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_shared_prompt_training_on_cuda(attn):
    """The shared-prompt training equals the per-candidate batch on CUDA, fp32, for both scorings, with the
    dense boolean block mask (sdpa) and with flex_attention's BlockMask."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_shared_prompt import assert_same_training, lora_model

    bb, batch = _decoder_and_batch()
    bb.model.cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    for scoring in ("head", "likelihood"):
        model, head = lora_model(bb)
        head.cuda()
        model.get_base_model().set_attn_implementation(attn)
        assert_same_training(model, head, batch, scoring, rtol=1e-4, atol=1e-5)  # TF32 off; CUDA kernels' sums


# ---------------------------------------------------------------- train.py runs (last: the slowest)
@pytest.mark.parametrize("backbone", ["tiny_encoder", "tiny_decoder"])
def test_bf16_true_lora_training(tmp_path, backbone):
    train(tmp_path, f"backbone={backbone}", "trainer=gpu")  # precision bf16-true


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_strategies(tmp_path, strategy):
    """DDP (bf16-mixed) with the likelihood scoring, FSDP (bf16-true) with the head, one process on one GPU."""
    scoring = "likelihood" if strategy == "ddp" else "head"
    train(tmp_path, "backbone=tiny_decoder", f"trainer={strategy}", "trainer.devices=1", "trainer.accelerator=gpu",
          f"method.module.scoring={scoring}")


def test_compile_on(tmp_path):
    train(tmp_path, "backbone=tiny_decoder", "trainer=gpu", "speed.compile=true", timeout=400)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_estimate_within_tolerance_of_the_cuda_peak(checkpointing):
    """The plan's activations + gradients + optimizer state of a LoRA step (bf16 weights, as bf16-true) against
    ``torch.cuda.max_memory_allocated`` above the memory before the step (tests/test_plan.py does it on the CPU)."""
    import peft
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recsys.models.shapes import meta_model
    from recsys.pipeline.plan import DEFAULTS, Setting, estimate, shape_of

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    shape = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048}
    st = Setting(method="lora", streams=1, adapters=1, frozen_adapters=0, r=16, targets=targets, dropout=0.05,
                 scoring="head", heads=0, ranks=1, batch=8, tokens=512, answer_tokens=0, weight_bytes=2, train_bytes=2,
                 act_bytes=2, fsdp=False, checkpointing=checkpointing, accumulate=1, examples=None,
                 plan={**DEFAULTS, "overhead_gb": 0.0})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa")).requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=list(targets))).to("cuda", torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (st.batch, st.tokens), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    hidden = model.base_model.model.model(input_ids=ids).last_hidden_state
    hidden[:, -1].float().pow(2).mean().backward()
    opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - start
    rows = estimate(shape_of(meta_model(Qwen2Config(**shape), "decoder"), "decoder"), st)["rows"]
    est = rows["activations"] + rows["gradients"] + rows["optimizer state (AdamW)"]
    print(f"cuda, checkpointing={checkpointing}: estimated {est / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, "
          f"ratio {est / measured:.2f}")
    assert abs(est / measured - 1) <= 0.25, est / measured


def test_fsdp2_on_one_gpu_equals_the_plain_gpu_run(tmp_path):
    """trainer=fsdp2 (hollow backbone, sharded read, CUDA to_empty) on one GPU in bf16-true: the same zero-shot
    metrics as trainer=gpu on the same saved decoder (the same weights read, the same LoRA and head drawn), and test
    metrics within bf16's noise after 3 steps."""
    from test_fsdp2_train import save_decoder

    save_decoder(tmp_path / "decoder")
    base = [f"backbone=hf", f"backbone.name={tmp_path / 'decoder'}", "backbone.dtype=bfloat16",
            "method.module.dropout=0", "trainer.limit_train_batches=3", "zero_shot=true"]
    for run in "ab":
        (tmp_path / run).mkdir()
    plain = train(tmp_path / "a", *base, "trainer=gpu")
    sharded = train(tmp_path / "b", *base, "trainer=fsdp2", "trainer.devices=1")
    zero = sorted(k for k in plain if k.startswith("zero_shot/test/"))
    assert zero and all(sharded[k] == pytest.approx(plain[k], abs=1e-3) for k in zero)
    assert sharded["test/ndcg@10"] == pytest.approx(plain["test/ndcg@10"], abs=0.05)
