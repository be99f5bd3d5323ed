"""Memory-light loading (recsys/models/sharded_load.py): 2 gloo processes build a saved decoder on the meta device,
shard it with FSDP2 and each read only its rows; the gathered weights and the logits equal the model's own, and each
rank holds half the parameters. (benchmarks/loading.py measures the peak host memory a rank.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recsys.models.sharded_load import read_rows, safetensors_header, shard_rows

REPO = Path(__file__).resolve().parents[1]


def test_shard_rows_cover_dim_0_as_torch_chunk_does():
    for rows, world in [(10, 2), (7, 2), (5, 4), (3, 4), (1, 2)]:
        spans = [shard_rows(rows, r, world) for r in range(world)]
        chunks = torch.arange(rows).chunk(world)
        assert [b - a for a, b in spans][:len(chunks)] == [len(c) for c in chunks]
        assert spans[0][0] == 0 and spans[-1][1] == rows


def test_read_rows_reads_only_the_rows_asked(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(7, 3, 5).to(torch.bfloat16)
    save_file({"w": w, "b": torch.arange(4.0)}, tmp_path / "model.safetensors")
    header, begin = safetensors_header(tmp_path / "model.safetensors")
    out = torch.empty(3, 3, 5, dtype=torch.bfloat16)
    read_rows(tmp_path / "model.safetensors", header, begin, "w", 2, 5, out)
    assert torch.equal(out, w[2:5])
    as_float = torch.empty(2, dtype=torch.float32)
    read_rows(tmp_path / "model.safetensors", header, begin, "b", 1, 3, as_float)
    assert as_float.tolist() == [1.0, 2.0]


@pytest.mark.slow  # two processes: ~40 s on a loaded 2-core machine
def test_two_ranks_load_their_shards_and_compute_the_model_s_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    p = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_load_worker.py"), str(tmp_path / "ckpt"),
                        str(tmp_path / "out.pt"), "2"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    res = torch.load(tmp_path / "out.pt", weights_only=True)
    own = dict(model.named_parameters())
    assert res["weights"].keys() == own.keys()
    for name, w in res["weights"].items():
        assert torch.equal(w, own[name].detach()), name
    with torch.no_grad():
        torch.testing.assert_close(res["logits"], model(input_ids=torch.arange(3, 19).view(2, 8)).logits)
    total = sum(p.numel() for p in model.parameters())
    assert sum(res["shares"]) == total and max(res["shares"]) <= total // 2 + 200  # each rank its half (+ odd rows)
