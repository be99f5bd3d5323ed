"""The chance check (issue 10, item 0): a run whose training loss stays at ln C after warm-up is
flagged in metrics.json and warned about; the spread of candidate scores is logged."""

import math

import lightning as L
import pytest
import torch

from recsys.data.datamodule import RecDataModule
from recsys.methods.lora import LoRAModule
from recsys.core.metrics import ChanceCheck
from recsys.models.backbone import load_backbone


def test_chance_check_by_hand():
    c = ChanceCheck()
    for loss in (math.log(5) * 1.005, math.log(5) * 0.997):
        c.update("train", torch.tensor(loss), 5)
    for loss in (1.2, 1.0):
        c.update("branch1/train", loss, 5)
    out = c.report()
    assert out["train"]["collapsed"] == 1.0 and out["train"]["chance_loss"] == pytest.approx(math.log(5))
    assert out["train"]["loss_after_warmup"] == pytest.approx(math.log(5) * 1.001)
    assert out["branch1/train"] == {"loss_after_warmup": pytest.approx(1.1), "chance_loss": pytest.approx(math.log(5)),
                                    "collapsed": 0.0}
    assert ChanceCheck().report() == {}


def fit(module, steps=6):
    dm = RecDataModule.from_config(domains={"tools": {"source": "synthetic", "num_users": 60, "num_items": 80, "seed": 0}},
                       target="tools", max_history=3, max_eval_users=8, batch_size=8)
    dm.attach(module.backbone.tokenizer, module.backbone.kind)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_a_collapsed_run_is_flagged_and_warned(caplog):
    """A head whose output ignores the input (v = 0, lr 0) scores every candidate alike: loss = ln 5."""
    torch.manual_seed(0)
    module = LoRAModule(load_backbone("tiny:encoder"), optimizer=lambda p: torch.optim.AdamW(p, lr=0.0))
    torch.nn.init.zeros_(module.head.out.weight)
    trainer = fit(module)
    assert trainer.callback_metrics["train/score_std"] == pytest.approx(0.0, abs=1e-6)
    with caplog.at_level("WARNING", logger="recsys"):
        health = module.training_health()
    assert health["train/collapsed"] == 1.0
    assert health["train/loss_after_warmup"] == pytest.approx(math.log(5), rel=1e-4)
    assert "stayed at chance" in caplog.text
