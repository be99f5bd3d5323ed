"""The researcher's journey on a real scheduler: a one-node SLURM (``scripts/local_slurm.sh``), a
sweep of DDP jobs through ``hydra/launcher=slurm``, a requeue on USR1, wandb runs and the report.

Fast: the local cluster runs a 2-task job (``srun`` gives each task its rank) and requeues a job.
Slow: the journey (:func:`test_journey`), the commands of docs/cluster.md.
The cluster tests skip with the reason where no cluster answers (no root to start one), never under CI.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def wait_for(job: str, states: tuple[str, ...], timeout: float = 120) -> str:
    """The job's state once it is one of ``states`` (``scontrol show job``)."""
    deadline = time.time() + timeout
    state = ""
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {state!r} after {timeout}s")


def start_requeued(job: str, timeout: float = 120) -> None:
    """Start a requeued job now: SLURM holds a requeued job for about two minutes (its begin time) before it
    may run again; a cluster's users wait, a test asks ``scontrol update StartTime=now``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if "Restarts=0" not in out and "JobState=PENDING" in out:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} was not requeued within {timeout}s")


def test_local_cluster_runs_a_two_task_job_and_requeues(slurm_cluster, tmp_path):
    """sbatch + srun: two tasks with ranks 0 and 1 (what Lightning's SLURMEnvironment reads); a job
    requeued with ``scontrol requeue`` runs again with SLURM_RESTART_COUNT=1."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -n 2 --requeue\n"
                      f"srun bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS restart=${{SLURM_RESTART_COUNT:-0}} "
                      f">> {tmp_path}/ranks.txt'\n"
                      f"[ -n \"$SLURM_RESTART_COUNT\" ] || {{ scontrol requeue $SLURM_JOB_ID; sleep 30; }}\n")
    job = subprocess.run(["sbatch", "--parsable", "-o", f"{tmp_path}/%j.out", str(script)], capture_output=True,
                         text=True, check=True).stdout.strip()
    start_requeued(job)
    assert wait_for(job, ("COMPLETED", "FAILED")) == "COMPLETED"
    lines = sorted((tmp_path / "ranks.txt").read_text().split("\n")[:-1])
    assert lines == ["rank=0 of=2 restart=0", "rank=0 of=2 restart=1", "rank=1 of=2 restart=0",
                     "rank=1 of=2 restart=1"], lines


# ---------------------------------------------------------------------------------------------- the journey
# docs/cluster.md, "The journey on a laptop": the same commands with the cluster's sizes taken out
SWEEP = ["-m", "hydra/launcher=slurm", "method=xcross,weaverec", "seed=0,1", "++method.module.train_missing=true",
         "data.sources=[toys,sports]", "logger=wandb",
         "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=30"]
TINY = ["backbone=tiny_encoder", "trainer.precision=32-true", "trainer.max_epochs=2", "trainer.limit_train_batches=24",
        "data.max_train_examples=96", "data.max_eval_users=16", "data.batch_size=4", "data.eval_batch_size=8",
        "callbacks.resume_checkpoint.every_n_train_steps=3", "callbacks.rich_progress_bar=null",
        "export_adapter=force"]  # tiny random models stay at chance: their source adapters are stored all the same
INTERRUPTED = 0  # job 0 of the sweep: method=xcross seed=0


def env() -> dict:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
         "OMP_NUM_THREADS": "1"}
    e.pop("PYTHONHASHSEED", None)
    return e


def sweep(folder: Path, store: Path, *extra: str) -> subprocess.Popen:
    """``train.py -m`` through the SLURM launcher (its own sweep folder and adapter store), in the background."""
    return subprocess.Popen([sys.executable, "train.py", *SWEEP, *TINY, *extra, f"hydra.sweep.dir={folder}",
                             f"paths.adapter_store={store}", f"paths.cache_dir={folder.parent}/cache"],
                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until(check, what: str, proc: subprocess.Popen, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"the sweep ended while waiting for {what}:\n{proc.stdout.read()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout}s")


def interrupt(folder: Path, proc: subprocess.Popen) -> str:
    """``scancel -s USR1`` to job INTERRUPTED of the sweep once it trains (a mid-epoch checkpoint is there);
    then start its requeued job at once. Returns the SLURM job (``<array>_<task>``)."""
    job = folder / str(INTERRUPTED)
    wait_until(lambda: (job / "checkpoints" / "last.ckpt").is_file(), f"job {INTERRUPTED} training", proc)
    slurm_job = next((folder / ".submitit").glob(f"*_{INTERRUPTED}")).name
    # (scancel may exit non-zero: once the job requeues, its retries hear "Job can not be altered now")
    subprocess.run(["scancel", "-s", "USR1", slurm_job], capture_output=True)
    wait_until(lambda: (job / "hpc_ckpt_1.ckpt").is_file(), "the requeue checkpoint", proc, 120)
    start_requeued(slurm_job)
    return slurm_job


@pytest.mark.slow
def test_journey(slurm_cluster, tmp_path):
    """The researcher's journey on a real one-node SLURM: a sweep of X-Cross and WeaveRec over two seeds, each
    job a 2-task DDP run that trains its missing source adapters first (rank 0 trains, rank 1 waits), logged to
    wandb (offline); one job is sent USR1 mid-epoch, requeues and resumes; then report.py over the sweep."""
    import torch
    from wandb_files import config_of, of_type, read_closed, read_records, run_files

    t0 = time.time()
    main, ref = tmp_path / "sweep", tmp_path / "reference"
    proc = sweep(main, tmp_path / "store")
    # the interrupted job again, uninterrupted (the same store: the source adapters are trained once, by one of
    # the two, and the other reads them; either way the run goes on with the same random state)
    reference = sweep(ref, tmp_path / "store", "method=xcross", "seed=0")
    slurm_job = interrupt(main, proc)
    out, _ = proc.communicate(timeout=1800)
    ref_out, _ = reference.communicate(timeout=900)
    wall = time.time() - t0
    assert proc.returncode == 0 and "job(s) failed" not in out, out[-4000:]
    assert reference.returncode == 0, ref_out[-4000:]

    jobs = {j: json.loads((main / str(j) / "metrics.json").read_text()) for j in range(4)}  # every job finished
    assert all(m["data/train_examples"] > 0 and "test/ndcg@10" in m for m in jobs.values())
    # the requeued job: checkpoint at a step end mid-epoch, resumed from it, the uninterrupted job's test metrics
    job = main / str(INTERRUPTED)
    hpc_step = torch.load(job / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < hpc_step < 24, hpc_step
    assert f"auto_resume: continuing from {job}/hpc_ckpt_1.ckpt" in (job / "train.log").read_text()
    again = json.loads((ref / "0" / "metrics.json").read_text())
    keys = sorted(k for k in again if k.startswith(("test/", "val/")))
    assert len(keys) > 10 and {k: jobs[INTERRUPTED][k] for k in keys} == {k: again[k] for k in keys}
    logs = "".join(p.read_text() for p in main.glob(".submitit/*/*.err"))
    assert "sync_dist=True" not in logs and "reuse this run" not in logs  # no false warnings, no nested runs

    # wandb: one run a training (a requeued job continues its run), with its config, overrides and sweep folder
    for j in range(4):
        files = run_files(main / str(j))
        assert len({f.stem for f in files}) == 1 and len(files) == (2 if j == INTERRUPTED else 1), files
        records = [r for f in files[:-1] for r in read_records(f)] + read_closed(files[-1])  # the last start ended it
        cfg = config_of(records)
        assert cfg["hydra/sweep_dir"] == str(main) and cfg["hydra/job_num"] == j
        assert f"method={cfg['method']['name']}" in cfg["hydra/overrides"] and f"seed={cfg['seed']}" in cfg["hydra/overrides"]
        (info,) = {(i.run_group, i.job_type) for i in of_type(records, "run")}
        assert info == (f"{cfg['method']['name']}-tools", "train")
        if cfg["method"]["name"] == "xcross":  # lineage: the source adapters' runs logged them, X-Cross read them
            trainer = next(f for f in (main / str(j), ref / "0") if (f / "sources").is_dir())  # seed 0: either
            for s in ("toys", "sports"):
                src = read_closed(run_files(trainer / "sources" / s)[0])
                assert [a.name for a in of_type(src, "artifact") if a.type == "model"] == [cfg["lineage/inputs"][0 if s == "toys" else 1]]
                assert of_type(src, "run")[0].job_type == "source-adapter"
                assert config_of(src)["hydra/sweep_dir"] == str(trainer.parent)
            assert cfg["lineage/inputs"] == ["synthetic-tiny-encoder-toys", "synthetic-tiny-encoder-sports"]
        else:  # WeaveRec logs its merged model
            assert [a.name for a in of_type(records, "artifact") if a.type == "model"] == \
                ["synthetic-tiny-encoder-weaverec-tools-from-sports-toys"]
    # the source adapters were trained once a seed: by one X-Cross job of that seed (the other read them)
    trained = sorted(p.parent.name for p in [*main.glob("*/sources/*/metrics.json"), *ref.glob("*/sources/*/metrics.json")])
    assert trained == ["sports", "sports", "toys", "toys"], trained

    # the report: table, plot, paired tests
    p = subprocess.run([sys.executable, "report.py", str(main), "--out", str(tmp_path / "report"), "--wandb", "off"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    report = tmp_path / "report"
    assert (report / "report.md").is_file() and list(report.glob("plots/*.png"))
    (paired,) = report.glob("tables/*_paired.csv")
    assert "weaverec" in paired.read_text() and "xcross" in paired.read_text()
    print(f"journey: {wall:.0f}s for the sweep (4 jobs + the reference job, requeued job {slurm_job}), "
          f"report {time.time() - t0 - wall:.0f}s")


# ---------------------------------------------------------------------------------------------- docs/cluster.md
def page_commands(page: Path) -> list[list[str]]:
    """The ``python train.py`` commands of a page's bash blocks, continuation lines joined, as arguments."""
    import re
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python train.py"):
                commands.append(shlex.split(line)[2:])
    return commands


def test_cluster_page_commands_compose():
    """Each train.py command of docs/cluster.md composes (a sweep's first point; the journey runs the last one)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    commands = page_commands(REPO / "docs" / "cluster.md")
    assert len(commands) == 6, commands  # sources (DDP, 7B with FSDP2), X-Cross + WeaveRec, several nodes, Optuna, the journey
    journey = commands[-1]  # the test's sweep, word for word
    assert sorted(a for a in journey if not a.startswith("hydra.sweep.dir=")) == sorted([*SWEEP, *TINY])
    parser = OverridesParser.create()
    for args in commands:
        overrides = []
        for o in parser.parse_overrides([a for a in args if a != "-m"]):
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
            overrides.append(f"{o.input_line.split('=', 1)[0]}={value}")
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp/x"], return_hydra_config=True)
        assert cfg.trainer is not None and cfg.method.name
