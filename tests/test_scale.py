"""Running at scale: DDP and FSDP trainer configs, the SLURM launcher config, Optuna searches, speed
switches, and exact resume after a kill.

Fast: configs compose (and their objects build), the FSDP policy makes all-frozen or all-trainable
units, speed switches on a tiny module, the resumable loader, and an Optuna search of 3 trials.
Slow (``-m slow``): DDP with 2 CPU processes (gloo) against 1 process, a DDP multirun, and a run
killed with SIGKILL / SIGTERM and started again, against an uninterrupted run.
The sweep through submitit's local executor is in test_report.py (the report reads it).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TINY = ["backbone=tiny_encoder", "logger=none", "callbacks.rich_progress_bar=null", "export_adapter=false"]


def compose_train(*overrides, hydra_cfg=False):
    return compose_config("train", "paths.output_dir=/tmp/recsys-test-scale", *overrides, hydra_cfg=hydra_cfg)


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
         "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    e.pop("PYTHONHASHSEED", None)
    return e


def run(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, f"train.py {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def same_results(a: dict, b: dict) -> None:
    keys = sorted(k for k in a if k.startswith(("test/", "val/", "zero_shot/", "random/", "popularity/", "params/")))
    assert len(keys) > 10
    assert {k: b.get(k) for k in keys} == {k: a[k] for k in keys}  # exactly


# ---------------------------------------------------------------------------------------------- configs
def test_ddp_config_builds_a_ddp_trainer():
    c = compose_train("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert c.trainer.use_distributed_sampler is False  # the DataModule shards by itself
    trainer = hydra.utils.instantiate(c.trainer, logger=False, callbacks=[])
    assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
    assert trainer.strategy._process_group_backend in (None, "gloo")  # chosen at set-up: gloo on CPUs


def test_fsdp_config_and_lora_wrap_policy():
    """Every FSDP unit the policy makes holds only frozen or only trainable weights (the LoRA pitfall)."""
    from recsys.methods.lora import LoRAModule
    from recsys.models.backbone import build_tiny

    c = compose_train("trainer=fsdp")
    strategy = hydra.utils.instantiate(c.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy" and strategy.kwargs["use_orig_params"] is True
    assert c.trainer.precision == "bf16-true"
    policy = hydra.utils.instantiate(c.trainer.strategy.auto_wrap_policy)
    module = LoRAModule(build_tiny("tiny:encoder"), r=4)
    units = policy._run_policy(module, set(), {})
    blocks = [m for m in units if type(m).__name__ == "BertLayer"]
    assert len(blocks) == 2
    others = [m for m in units if type(m).__name__ != "BertLayer"]  # LoRA A/B leaves, and the head as one unit
    assert others and all(p.requires_grad for m in others for p in m.parameters())
    assert any(type(m).__name__ == "ScoringHead" for m in others)  # its forward reads its layers' weights itself
    assert not any(a is not b and b in set(a.modules()) for a in others for b in others)  # none inside another
    assert {id(p) for m in others for p in m.parameters()} == {id(p) for p in module.parameters() if p.requires_grad}
    # what stays in a block unit once its trainable leaves are units of their own: frozen weights only
    for block in blocks:
        inner = {id(p) for m in block.modules() if m in units and m is not block for p in m.parameters()}
        rest = [p for p in block.parameters() if id(p) not in inner]
        assert rest and not any(p.requires_grad for p in rest)
    # named blocks work too
    named = hydra.utils.instantiate(c.trainer.strategy.auto_wrap_policy, blocks=["BertLayer"])
    assert sum(type(m).__name__ == "BertLayer" for m in named._run_policy(module, set(), {})) == 2


def test_slurm_launcher_composes(tmp_path):
    """Cluster shape follows the trainer (one task a GPU); site settings from conf/local/slurm.yaml
    (here through a search path), the command line over both."""
    c = compose_train("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                      "hydra.launcher.partition=gpu", "hydra.launcher.account=proj", hydra_cfg=True)
    launcher = OmegaConf.to_container(c.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 4, 4)
    assert (launcher["partition"], launcher["account"]) == ("gpu", "proj")
    assert launcher["max_num_timeout"] == 0 and c.auto_resume is True  # Lightning requeues, submitit not; jobs resume
    obj = hydra.utils.instantiate(c.hydra.launcher)
    assert obj.params["tasks_per_node"] == 4 and obj.params["partition"] == "gpu"
    script = sbatch_script(obj.params, tmp_path)
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=proj",
                 "--time=240", "--signal=USR1@120", "--requeue"):  # USR1: SlurmRequeue's signal
        assert f"#SBATCH {line}\n" in script, (line, script)
    assert "USR2" not in script  # submitit's own signal is never sent

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "slurm.yaml").write_text("partition: site-gpu\naccount: site-account\ntimeout_min: 30\n")
    c = compose_train("hydra/launcher=slurm", f"hydra.searchpath=[file://{tmp_path}]", "hydra.launcher.account=mine",
                      hydra_cfg=True)
    launcher = OmegaConf.to_container(c.hydra.launcher, resolve=True)
    assert (launcher["partition"], launcher["account"], launcher["timeout_min"]) == ("site-gpu", "mine", 30)
    assert (launcher["nodes"], launcher["tasks_per_node"]) == (1, 1)  # trainer=cpu: one process

    c = compose_train("hydra/launcher=local", hydra_cfg=True)
    assert c.hydra.launcher._target_.endswith("LocalLauncher")


def sbatch_script(params: dict, tmp_path: Path) -> str:
    """The sbatch file submitit writes for these launcher params (as the plugin passes them), off a
    cluster: a stand-in ``srun`` on PATH lets submitit build its SLURM executor."""
    import shutil

    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old}"
    try:
        assert shutil.which("srun")
        params = dict(params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "submitit"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        params.pop("submitit_folder")
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    finally:
        os.environ["PATH"] = old


def test_multinode_preset_renders_its_sbatch_script(tmp_path):
    """cluster=slurm_multinode: N nodes x G GPUs, one task a GPU started by srun, USR1 for the requeue."""
    c = compose_train("cluster=slurm_multinode", "trainer.num_nodes=4", "trainer.devices=8",
                      "hydra.launcher.partition=gpu", "+hydra.launcher.additional_parameters.mail-user=me@lab.org",
                      hydra_cfg=True)
    assert c.trainer.strategy._target_.endswith("DDPStrategy") and c.trainer.accelerator == "gpu"
    obj = hydra.utils.instantiate(c.hydra.launcher)
    script = sbatch_script(obj.params, tmp_path)
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--partition=gpu",
                 "--signal=USR1@120", "--requeue", "--mail-user=me@lab.org"):
        assert f"#SBATCH {line}\n" in script, (line, script)
    (srun,) = [ln for ln in script.splitlines() if ln.startswith("srun ")]
    assert srun.startswith("srun --unbuffered --output ") and srun.endswith("python -u -m submitit.core._submit x")


def test_resume_takes_the_newest_checkpoint_whoever_wrote_it(tmp_path):
    """last.ckpt (ours), epochNN.ckpt (model selection), hpc_ckpt_<n>.ckpt (Lightning's SLURM requeue, in
    the run folder): the newest readable one."""
    from recsys.pipeline.scale import resume_checkpoint

    (tmp_path / "checkpoints").mkdir()
    files = {"last": tmp_path / "checkpoints" / "last.ckpt", "best": tmp_path / "checkpoints" / "epoch00.ckpt",
             "hpc": tmp_path / "hpc_ckpt_1.ckpt"}
    for i, (name, path) in enumerate(files.items()):
        torch.save({"loops": {}, "state_dict": {}, "global_step": i, "name": name}, path)
    def touch(name, t):
        os.utime(files[name], (t, t))
    touch("last", 100), touch("best", 50), touch("hpc", 200)
    assert resume_checkpoint(tmp_path) == str(files["hpc"])
    touch("hpc", 10)
    assert resume_checkpoint(tmp_path) == str(files["last"])
    files["last"].write_bytes(b"half written")  # newest but unreadable: skipped
    touch("last", 300)
    assert resume_checkpoint(tmp_path) == str(files["best"])


@pytest.mark.parametrize("search,method,keys", [
    ("optuna", "lora", ["recipe.optimizer.lr", "method.module.r"]),
    ("optuna_xcross", "xcross", ["recipe.optimizer.lr", "method.module.beta", "method.module.gamma"]),
])
def test_hparams_search_composes(search, method, keys):
    if not (CONF / "method" / f"{method}.yaml").is_file():
        pytest.skip(f"conf/method/{method}.yaml is not there")
    c = compose_train(f"hparams_search={search}", hydra_cfg=True)
    sweeper = c.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.direction == "maximize" and c.optimized_metric == "val/ndcg@10"
    assert str(c.hydra.mode).endswith("MULTIRUN") and c.method.name == method
    assert sorted(sweeper.params) == sorted(keys)
    for key in keys:  # each searched key exists in the method's config: the trials' overrides apply
        assert OmegaConf.select(c, key) is not None, key


def test_ddp_child_command():
    from recsys.pipeline.scale import _config_flags, _quote

    argv = ["-m", "--config-name", "train", "seed=0,1", "-cp=conf", "x=1"]
    assert _config_flags(argv) == ["--config-name", "train", "-cp=conf"]
    assert _quote("/a/b c=d") == "'/a/b c=d'" and _quote("it's") == '"it\'s"'


# ---------------------------------------------------------------------------------------------- speed
def _tiny_lora(seed=0):
    from recsys.methods.lora import LoRAModule
    from recsys.models.backbone import build_tiny

    torch.manual_seed(seed)
    return LoRAModule(build_tiny("tiny:encoder"), r=4, dropout=0.0)


def _loss_and_grads(module):
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (4, 12))
    out = module.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    loss = module.head(out[:, 0]).float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters() if p.requires_grad]


def test_speed_switches_on_cpu():
    from recsys.pipeline import speed

    c = compose_train()
    assert {"compile", "activation_checkpointing", "matmul_precision"} <= set(c.speed)
    assert "fused" in c.method.module.optimizer
    plain = _tiny_lora().train()
    checkpointed = speed.apply(_tiny_lora().train(), {"activation_checkpointing": True})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    (l1, g1), (l2, g2) = _loss_and_grads(plain), _loss_and_grads(checkpointed)
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    # compile: in place, block by block (compiles lazily on the first call: not run here)
    compiled = speed.apply(_tiny_lora(), {"compile": True, "compile_mode": "default"})
    from recsys.models.backbone import transformer_layers

    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_layers(compiled.model))
    assert set(compiled.state_dict()) == set(plain.state_dict())  # names unchanged: checkpoints load
    # fused AdamW from the method config
    opt = hydra.utils.instantiate(c.method.module.optimizer, fused=True)(plain.trainable_parameters())
    opt.step()


# ---------------------------------------------------------------------------------------------- resume units
def test_resumable_loader_goes_on_mid_epoch():
    from recsys.data.datamodule import EpochBatchSampler, ResumableLoader

    class Keys(torch.utils.data.Dataset):  # returns the (index, epoch) key the sampler asks for
        def __len__(self):
            return 50

        def __getitem__(self, key):
            return key

    def loader():
        return ResumableLoader(Keys(), batch_sampler=EpochBatchSampler(50, 4, shuffle=True, seed=3, pad=True),
                               collate_fn=lambda b: [i for i, _ in b])

    a = loader()
    a.batch_sampler.set_epoch(2)
    it = iter(a)
    seen = [next(it) for _ in range(5)]
    state = a.state_dict()
    assert state == {"epoch": 2, "batches": 5}
    rest = list(it)
    b = loader()
    b.load_state_dict(state)
    assert list(b) == rest and seen + rest == list(a)  # the restored pass goes on; the next pass is whole
    c = loader()
    c.load_state_dict({"epoch": 2, "batches": len(c)})  # saved at the end of epoch 2: epoch 3 starts afresh
    c.batch_sampler.set_epoch(3)
    assert len(list(c)) == len(c)
    d = loader()
    d.load_state_dict({"epoch": 2, "batches": len(d)})  # a stream that had ended mid-epoch 2: it stays ended
    d.batch_sampler.set_epoch(2)
    assert list(d) == []


def test_a_shorter_stream_that_had_ended_stays_ended_after_a_resume():
    """WeaveRec's streams in a CombinedLoader (max_size): saved after the short stream ended, restored into new
    loaders through Lightning's own _state_dicts / _load_state_dicts and set_epoch, the epoch goes on exactly
    as it would have (the short stream None to its end, not a replay of its epoch); the next epoch is whole."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.utilities import CombinedLoader

    from recsys.data.datamodule import EpochBatchSampler, ResumableLoader

    class Keys(torch.utils.data.Dataset):  # an (index, epoch) key -> the index
        def __getitem__(self, key):
            return key[0]

    def combined():
        return CombinedLoader({name: ResumableLoader(Keys(), collate_fn=list, batch_sampler=EpochBatchSampler(
            n, 4, shuffle=True, seed=3, pad=True)) for name, n in (("target", 40), ("hybrid", 12))}, mode="max_size")

    def epoch(loader, e, state=None):  # CombinedLoader's iterator is the loader itself: iter() starts over
        if state is not None:
            loader._load_state_dicts(state)
        for dl in loader.flattened:
            _set_sampler_epoch(dl, e)
        return iter(loader)

    def rest(it):
        out = []
        while (batch := next(it, None)) is not None:
            out.append({k: None if v is None else tuple(v) for k, v in batch[0].items()})
        return out

    a = combined()
    it = epoch(a, 1)
    seen = [next(it) for _ in range(6)]  # the hybrid stream ended after 3 batches
    assert seen[-1][0]["hybrid"] is None
    state, remainder = a._state_dicts(), rest(it)
    assert len(remainder) == 4 and state == [{"epoch": 1, "batches": 6}, {"epoch": 1, "batches": 3}]
    b = combined()
    assert rest(epoch(b, 1, state)) == remainder
    assert rest(epoch(b, 2)) == rest(epoch(combined(), 2))


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    from recsys.pipeline.scale import ResumeState

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.save({"s": ResumeState().state_dict()}, tmp_path / "x.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    cb = ResumeState()
    cb.load_state_dict(torch.load(tmp_path / "x.ckpt", weights_only=True)["s"])  # plain tensors and values
    torch.rand(7), np.random.rand(7), random.random()  # draws between restore and the first batch
    cb.on_train_batch_start(None, None, None, 0)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_auto_resume_refuses_another_configuration(tmp_path):
    """A run folder reused for another run does not silently continue the old checkpoint."""
    from recsys.pipeline.scale import resume_checkpoint

    cfg = compose_train(f"paths.output_dir={tmp_path}", "logger=csv")
    assert resume_checkpoint(tmp_path, cfg) is None  # first start: keeps the settings
    assert (tmp_path / "checkpoints" / "config.json").is_file()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")  # e.g. killed while writing
    moved = compose_train(f"paths.output_dir={tmp_path}/moved", "logger=wandb", "trainer.devices=1",
                          "speed.compile=true")
    assert resume_checkpoint(tmp_path, moved) is None  # same training settings; the unreadable file is skipped
    other = compose_train(f"paths.output_dir={tmp_path}", "method.module.r=16", "seed=3")
    with pytest.raises(ValueError, match=r"another configuration \(method.module.r: 8 -> 16, seed: 0 -> 3\)"):
        resume_checkpoint(tmp_path, other)


# ---------------------------------------------------------------------------------------------- Optuna
def test_optuna_three_trials(tmp_path):
    """optuna 2.10.1 (the newest hydra-optuna-sweeper 1.3 accepts) runs here (numpy 2, in-memory study).
    The rank may be 0 here: those trials fail (failed.json), optuna marks them failed, the search goes on."""
    t0 = time.time()
    p = run("hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
            'hydra.sweeper.params={method.module.r:"choice(0,4)"}', *TINY, "logger=csv", "trainer.limit_train_batches=2",
            "data.max_eval_users=8", "data.max_train_examples=64", f"hydra.sweep.dir={tmp_path}/sweep",
            f"paths.adapter_store={tmp_path}/store", "export_adapter=force", check=False)  # tiny runs collapse
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 3
    rank = {j: OmegaConf.load(j / ".hydra" / "config.yaml").method.module.r for j in jobs}
    ok = [j for j in jobs if (j / "metrics.json").is_file()]
    failed = [j for j in jobs if (j / "failed.json").is_file()]
    assert ok and failed and sorted(ok + failed) == jobs
    # the search went on past the failed trials, then said which failed and exited 1 (recsys.pipeline.sweeps)
    assert p.returncode == 1, p.stderr[-3000:]
    summary = p.stderr[p.stderr.index(f"sweep {tmp_path}/sweep: {len(failed)} job(s) failed"):].splitlines()
    assert [line.split(":")[0].strip() for line in summary[1:1 + len(failed)]] == [str(j) for j in failed]
    assert all(line.endswith("UserError: method.module.r=0 must be >= 1") for line in summary[1:1 + len(failed)])
    assert all(rank[j] == 0 for j in failed) and all(rank[j] == 4 for j in ok)
    for j in ok:  # each trial logged as trial-<number>, in the study's group (the CSV logger's hparams)
        hp = OmegaConf.load(j / "csv" / "hparams.yaml")
        assert (hp.run_name, hp.group) == (f"trial-{j.name}", "optuna-lora-tools")
    result = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert result.best_params["method.module.r"] == 4 and 1e-4 <= result.best_params["recipe.optimizer.lr"] <= 1e-2
    assert result.best_value == max(metrics(j)["val/ndcg@10"] for j in ok)
    # each trial exported into its own folder; the store holds the best trial's adapter (by validation), not the last's
    best = max(ok, key=lambda j: metrics(j)["val/ndcg@10"])
    assert all((j / "trial_store" / "tiny-encoder" / "tools" / "seed-0" / "manifest.json").is_file() for j in ok)
    manifest = json.loads((tmp_path / "store" / "tiny-encoder" / "tools" / "seed-0" / "manifest.json").read_text())
    assert (manifest["trial"], manifest["trial_value"]) == (best.name, metrics(best)["val/ndcg@10"])
    assert manifest["run_dir"] == str(best) and manifest["trial_metric"] == "val/ndcg@10"
    lrs = {OmegaConf.load(j / ".hydra" / "config.yaml").recipe.optimizer.lr for j in jobs}
    assert len(lrs) == 3  # three different proposals
    print(f"optuna 3 trials: {time.time() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------- DDP (slow)
EVAL = [*TINY, "data.max_eval_users=37", "data.eval_batch_size=8"]  # odd: ranks get 19 and 18


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """The command as written, evaluation only: the same test metrics (summed over ranks) as 1 process,
    one run folder, only rank 0 writing; the same with ranks set by SLURM's variables (srun); then a
    2-process multirun that trains: a folder a job, each job's ranks running that job."""
    one, two = tmp_path / "one", tmp_path / "two"
    elsewhere = set(REPO.glob("outputs/**/*rank*.log"))
    run(*EVAL, "trainer.max_epochs=0", "seed=1", f"hydra.run.dir={one}")
    run("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *EVAL, "trainer.max_epochs=0", "seed=1",
        f"hydra.run.dir={two}")
    same_results(metrics(one), metrics(two))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no folder for rank 1
    assert set(REPO.glob("outputs/**/*rank*.log")) == elsewhere
    assert (two / "train_rank1.log").is_file()  # rank 1 logged into rank 0's folder
    assert OmegaConf.load(two / ".hydra" / "hydra.yaml").hydra.job.name == "train"  # and left .hydra/ alone

    # as in a SLURM job: srun starts one task a device, Lightning's SLURMEnvironment reads their ranks
    slurm = tmp_path / "slurm"
    procs = [subprocess.Popen(
        [sys.executable, "train.py", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *EVAL,
         "trainer.max_epochs=0", "seed=1", f"hydra.run.dir={slurm}"], cwd=REPO, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**env(), "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(r),
             "SLURM_LOCALID": str(r), "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "train",
             "SLURM_JOB_ID": "4242"}) for r in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in errs[0]
    same_results(metrics(one), metrics(slurm))

    sweep = tmp_path / "sweep"
    run("-m", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *EVAL, "trainer.limit_train_batches=3",
        "seed=0,1", f"hydra.sweep.dir={sweep}", f"paths.adapter_store={tmp_path}/st")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for j in jobs:
        m = metrics(j)
        assert m["data/train_examples"] > 0 and (j / "checkpoints" / "last.ckpt").is_file()
        assert (j / "train_rank1.log").is_file()  # rank 1 ran this job, in this folder
    # job 1's rank 1 ran job 1 (seed 1): the synchronised zero-shot metrics are the 1-process seed-1 ones
    for prefix in ("zero_shot/", "random/", "popularity/"):
        assert {k: v for k, v in metrics(jobs[1]).items() if k.startswith(prefix)} == \
            {k: v for k, v in metrics(one).items() if k.startswith(prefix)}


@pytest.mark.slow
def test_global_batch_trains_alike_on_one_and_two_processes(tmp_path):
    """``data.batch_size`` is the global batch: the default run (MiniLM, 640 examples, batch 16) trained
    on 1 and on 2 processes (8 a rank) makes the same optimizer steps and reaches the same test metrics
    (within 0.02 NDCG@10; the ranks' dropout masks differ). Per-rank batches gave 0.737 vs 0.695."""
    base = ["logger=none", "callbacks.rich_progress_bar=null", "export_adapter=false", "zero_shot=false"]
    run(*base, f"hydra.run.dir={tmp_path}/one")
    run(*base, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path}/two")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    steps = [torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
             for p in (tmp_path / "one", tmp_path / "two")]
    assert steps[0] == steps[1] == 40, steps  # 640 examples / 16
    print(f"global batch 16: test NDCG@10 {one['test/ndcg@10']:.4f} (1 process) vs {two['test/ndcg@10']:.4f} (2)")
    assert one["test/ndcg@10"] > 0.5  # it learned (zero-shot is ~0.18)
    assert abs(one["test/ndcg@10"] - two["test/ndcg@10"]) <= 0.02, (one["test/ndcg@10"], two["test/ndcg@10"])
    with pytest.raises(AssertionError, match="must divide evenly over the 2 processes"):
        run(*base, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=15",
            "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/odd")


# ---------------------------------------------------------------------------------------------- resume (slow)
RESUME = [*TINY, "data.max_eval_users=8", "zero_shot=false", "trainer.max_epochs=2", "trainer.limit_train_batches=12",
          "callbacks.resume_checkpoint.every_n_train_steps=3"]


SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "uninterrupted"
    run(*RESUME, f"hydra.run.dir={folder}")
    return metrics(folder)


@pytest.mark.slow
@pytest.mark.parametrize("sig,logger", [(signal.SIGKILL, "none"), (signal.SIGTERM, "wandb")],
                         ids=["SIGKILL", "SIGTERM-wandb"])
def test_resume_after_a_kill(tmp_path, uninterrupted, sig, logger):
    """Killed mid-epoch once a checkpoint exists, started again with the same command: the same metrics,
    and the same wandb run (offline here)."""
    folder = tmp_path / "run"
    command = [*RESUME, f"logger={logger}", f"hydra.run.dir={folder}"]
    args = [sys.executable, "train.py", *command]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before a checkpoint:\n{proc.stderr.read()[-3000:]}"
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (folder / "metrics.json").exists(), err[-3000:]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
    from recsys.pipeline.scale import resume_checkpoint

    state = torch.load(resume_checkpoint(folder), map_location="cpu", weights_only=True)
    assert 0 < state["global_step"] < 24  # killed before the end of training
    p = run(*command)
    assert "auto_resume: continuing from" in p.stderr + p.stdout
    same_results(uninterrupted, metrics(folder))
    if logger == "wandb":  # both starts logged to the run whose id the folder keeps
        run_id = (folder / "wandb_id.txt").read_text().strip()
        runs = sorted((folder / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs


@pytest.mark.slow
def test_slurm_requeue_resumes_from_the_newest_checkpoint(tmp_path, uninterrupted):
    """A simulated SLURM job: SLURM's variables set, USR1 sent mid-epoch (as --signal=USR1@120 does),
    a stand-in scontrol on PATH that records its call. SlurmRequeue writes hpc_ckpt_1.ckpt and requeues;
    the job is then killed (as SLURM does on requeue) and started again: it resumes from the hpc
    checkpoint, newer than last.ckpt, and ends with the metrics of an uninterrupted run."""
    folder, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    job_env = {**env(), **SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "train.py", *RESUME, f"hydra.run.dir={folder}"]
    proc = subprocess.Popen(command, cwd=REPO, env=job_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before a checkpoint:\n{proc.stderr.read()[-3000:]}"
    time.sleep(0.5)  # a few more steps
    os.kill(proc.pid, signal.SIGUSR1)
    while not calls.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # SLURM ends the requeued job
    _, err = proc.communicate(timeout=120)
    assert calls.read_text().split() == ["requeue", "4242"], err[-3000:]
    hpc = folder / "hpc_ckpt_1.ckpt"
    assert hpc.is_file() and not (folder / "metrics.json").exists()
    hpc_step = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < hpc_step < 24
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] <= hpc_step
    p = subprocess.run(command, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"auto_resume: continuing from {hpc}" in p.stderr + p.stdout
    same_results(uninterrupted, metrics(folder))

