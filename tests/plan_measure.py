"""Measured for tests/test_plan.py, in a process of its own: the peak resident memory of one LoRA training step
(forward, backward, AdamW step) of a small random Qwen2 decoder in float32 on the CPU, above the memory before the
step. Large allocations go straight to mmap and are returned on free (MALLOC_MMAP_THRESHOLD_, set by the caller), so
the resident set follows the live tensors and the high-water mark is their peak (VmHWM).

    python tests/plan_measure.py '{"shape": {...}, "batch": 8, "tokens": 256, "checkpointing": false, ...}'
"""

import json
import resource
import sys

import peft
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: its own memory map's high-water mark; ``ru_maxrss`` would start at
    the parent's resident set when it forked)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(spec: dict) -> dict:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**spec["shape"], attn_implementation="sdpa"))
    model.requires_grad_(False)
    lora = peft.LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=spec["dropout"],
                           target_modules=spec["targets"])
    model = peft.get_peft_model(model, lora)
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    body = model.base_model.model.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, spec["shape"]["vocab_size"], (spec["batch"], spec["tokens"]))
    before = rss_bytes()
    peak_before = peak_rss_bytes()
    hidden = body(input_ids=ids).last_hidden_state
    hidden[:, -1].pow(2).mean().backward()  # the pooled last token, as a scoring head reads it
    opt.step()
    peak = peak_rss_bytes()
    return {"peak_above_start": peak - before, "peak_before_step_above_start": peak_before - before,
            "trainable": sum(p.numel() for p in params)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(main(json.loads(sys.argv[1]))))
