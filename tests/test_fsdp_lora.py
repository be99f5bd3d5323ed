"""FSDP's LoRA wrap policy (recsys.pipeline.speed.lora_fsdp_policy) run by PyTorch's FSDP itself on 2 CPU processes
(gloo; Lightning refuses strategy=fsdp without a GPU, so its path is in tests/test_gpu.py): the LoRA and head
gradients and the weights after one AdamW step equal one process's on the whole batch, and the frozen units keep
no gradient storage."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes importing transformers and lightning: ~40 s on a loaded 2-core machine
def test_fsdp_with_the_lora_policy_matches_one_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    p = subprocess.run([sys.executable, str(REPO / "tests" / "fsdp_lora_worker.py"), str(out), "2"],
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = torch.load(out, weights_only=True)
    ref = res["reference"]
    assert res["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 4
    assert any("lora_A" in n for n in ref["grads"]) and any("head" in n for n in ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(res["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        assert g.abs().sum() > 0 or "lora_A" in name, name  # B starts at zero: A's first gradient is zero
    for name, w in ref["after"].items():
        torch.testing.assert_close(res["after"][name], w, rtol=1e-4, atol=1e-6, msg=name)
    frozen = [u for u in res["units"] if not u[0]]
    trainable = [u for u in res["units"] if u[0]]
    assert frozen and trainable
    assert not any(has_grad for _, has_grad, _ in frozen)  # frozen weights: no gradient storage
    assert all(has_grad for _, has_grad, _ in trainable)
    assert sum(n for _, _, n in frozen) > 10 * sum(n for _, _, n in trainable)
