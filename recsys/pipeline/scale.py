"""Running at scale: DDP processes under Hydra, auto-resume after a crash, and the wandb run it continues.

- :func:`job_scope` wraps one train/evaluate job: DDP ranks started by Lightning run the *same job* in
  the *same folder* (also inside a multirun), and a local multirun can run one DDP job after another.
- :func:`resume_checkpoint` finds the checkpoint a killed run restarts from (``auto_resume: true``).
- :class:`ResumeState` puts the training loaders back at their mid-epoch position and restores the
  random number generators: a resumed run trains on the batches, with the dropout masks, of an
  uninterrupted one.
- :func:`wandb_resume_kwargs`: a run restarted in its folder continues the same wandb run.
- :class:`SlurmRequeue`: the one requeue mechanism on SLURM (checkpoint at a step end on USR1, requeue).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import time
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from recsys.core.errors import UserError
from recsys.core.files import read_json, write_json, write_text, write_with

log = logging.getLogger("recsys")

# ---------------------------------------------------------------------------------------------- DDP + Hydra
# Lightning starts ranks 1..N-1 of a one-node DDP run by running the script again with the same command
# line plus ``hydra.run.dir=<rank 0's run.dir>`` (lightning/fabric/strategies/launchers/subprocess_script.py).
# That is right for a single run, wrong in a multirun: the command line holds ``-m`` and every sweep
# value (each rank would start a whole sweep of its own), ``run.dir`` is not the job's folder, and an
# ``hparams_search`` config sets ``hydra.mode: MULTIRUN`` by itself. The command below runs the job
# rank 0 runs: its own overrides, its folder, in RUN mode, and without writing ``.hydra/`` again.
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_KEEP_HYDRA = ("hydra.job.chdir", "hydra.verbose", "hydra/job_logging", "hydra/hydra_logging",
               "hydra.job_logging", "hydra.hydra_logging", "hydra.searchpath")
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _quote(value: str) -> str:
    """A Hydra override value as a quoted string (paths may hold '=', ',', spaces)."""
    if "'" not in value:
        return f"'{value}'"
    return '"' + value.replace('"', '\\"') + '"'


def _config_flags(argv: list[str]) -> list[str]:
    """The ``--config-path/--config-name/--config-dir`` flags of a command line, as given."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in _CONFIG_FLAGS:
            if "=" in arg:
                out.append(arg)
            elif i + 1 < len(argv):
                out += [arg, argv[i + 1]]
                i += 1
        i += 1
    return out


def hydra_ddp_command(local_rank: int) -> tuple[list[str], str]:
    """The command (and working folder) that starts DDP rank ``local_rank`` of the running Hydra job."""
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += _config_flags(sys.argv[1:])
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if o.lstrip("+~").split("=", 1)[0] in _KEEP_HYDRA]
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}",  # the job's folder, also in a multirun
        f"hydra.job.name={hc.job.name}_rank{local_rank}",  # its own log file in that folder
        "hydra.output_subdir=null",  # rank 0 wrote .hydra/ already
    ]
    return command, get_original_cwd()


def install_hydra_ddp_launcher() -> None:
    """Make Lightning start DDP ranks with :func:`hydra_ddp_command` (both its launchers import the helper)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

    fabric_launcher._hydra_subprocess_cmd = hydra_ddp_command
    pl_launcher._hydra_subprocess_cmd = hydra_ddp_command


@contextmanager
def job_scope():
    """One train/evaluate job: DDP ranks run this job in its folder, and the job leaves no process group
    and no DDP variables behind (Lightning sets them on launching), so the next job of a local multirun
    starts its own ranks on a fresh port. A job stopped by SIGTERM exits with 143 (Lightning: 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    install_hydra_ddp_launcher()
    env = {k: os.environ.get(k) for k in _DDP_ENV}
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    except SIGTERMException:  # Lightning stops after the batch and exits 0: say it did not finish
        log.warning("stopped by SIGTERM: the same command (same run folder) resumes from checkpoints/last.ckpt")
        raise SystemExit(143) from None
    finally:
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def global_rank() -> int:
    """This process's rank as the environment says (0 before Lightning starts other processes)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


# ---------------------------------------------------------------------------------------------- resume
# keys that may change between a run and its restart: where files go, what logs, how it is launched
_RESUME_FREE = re.compile(
    r"^(paths|logger|hydra|auto_resume|ckpt_path|speed|run_name|group|tags|job_type"
    r"|callbacks\.(rich_progress_bar|learning_rate_monitor|slurm_requeue)|callbacks\.[^.]+\.dirpath"
    r"|callbacks\.(model_checkpoint|resume_checkpoint)\._target_"
    r"|trainer\.(devices|num_nodes|accelerator|strategy|enable_progress_bar|default_root_dir)"
    r"|data\.(num_workers|cache_dir|_target_))(\.|$)"  # data._target_: in the configs of runs before typed data settings
)


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k: v for key, value in d.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: d}


def training_config(cfg) -> dict:
    """The settings a checkpoint depends on, as flat ``key: value`` (resolved)."""
    from omegaconf import OmegaConf

    flat = _flat(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items() if not _RESUME_FREE.match(k)}


def check_config(run_dir: str | Path, cfg) -> None:
    """Keep the training settings in ``<run_dir>/checkpoints/config.json`` on the first start; refuse a restart
    under other settings (the same folder reused for another run) while checkpoints are there."""
    folder = Path(run_dir) / "checkpoints"
    saved, now = folder / "config.json", json.loads(json.dumps(training_config(cfg), default=str))
    if saved.is_file() and any(folder.glob("*.ckpt")):
        before = read_json(saved, "it records the settings of the checkpoints beside it: delete it to go on under "
                                  "this command's settings, or use a new hydra.run.dir")
        changed = sorted(k for k in set(before) | set(now) if before.get(k, "<unset>") != now.get(k, "<unset>"))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k, '<unset>')!r} -> {now.get(k, '<unset>')!r}" for k in changed[:8])
            raise UserError(
                f"auto_resume: {folder} holds checkpoints of another configuration ({diff}). Use a new "
                "hydra.run.dir; or auto_resume=false to train from scratch in this folder; or "
                f"ckpt_path={folder}/last.ckpt to go on from it under the new settings on purpose."
            )
    elif global_rank() == 0:
        write_json(saved, now)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, read with ``torch.load(weights_only=True)``: tensors and plain values only, so
    a checkpoint from someone else cannot run code. UserError naming the file if it is cut short, not a
    checkpoint, or holds other objects."""
    if not _checkpoint_format(path):
        raise UserError(
            f"{path}: not a checkpoint (neither torch's zip format nor a pickle: the file holds other bytes); "
            "pass a checkpoint written by this project's train.py (ckpt_path=<run>/checkpoints/last.ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused, it holds objects other than tensors and plain values, which loading could run as "
            f"code ({str(e).splitlines()[0]}); use a checkpoint written by this project's train.py"
        ) from None
    except Exception as e:  # a cut-short file fails anywhere in the unpickler (EOFError, KeyError, RuntimeError ...)
        raise UserError(
            f"{path}: not a readable checkpoint, probably cut short while written or copied ({e}); copy it again, "
            "train again (python train.py with the run's settings, same hydra.run.dir: auto_resume goes on from "
            "the last good checkpoint), or pass another one with ckpt_path="
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path}: not a Lightning checkpoint of this project (no state_dict)")
    return state


def _checkpoint_format(path: str | Path) -> bool:
    """Whether ``path`` starts as a torch checkpoint does: a zip archive (torch >= 1.6) or a pickle (older)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # torch.load names what is wrong with it
    return not head or head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or head[:1] == b"\x80"  # empty: cut short


def resume_checkpoint(run_dir: str | Path, cfg=None) -> str | None:
    """The checkpoint a restarted run continues from: the newest training checkpoint, whichever wrote it:
    ``checkpoints/last.ckpt`` (every ``callbacks.resume_checkpoint.every_n_train_steps`` steps and after each
    validation), the model-selection ones, or ``hpc_ckpt_<n>.ckpt`` in the run folder (Lightning's SLURM
    requeue writes it on USR1); one that cannot be read (a kill while writing) is skipped. None: afresh.

    With ``cfg``, the settings are checked first (:func:`check_config`)."""
    folder = Path(run_dir) / "checkpoints"
    if cfg is not None:
        check_config(run_dir, cfg)
    candidates = [*folder.glob("*.ckpt"), *Path(run_dir).glob("hpc_ckpt_*.ckpt")]
    # newest first; at equal times last.ckpt (Lightning writes it after the others of the same step)
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True):
        try:
            state = load_checkpoint(path)
            if "loops" not in state:
                raise UserError("not a training checkpoint (no loop state)")
        except UserError as e:  # any unreadable file is skipped
            log.warning("auto_resume: skipping %s (%s)", path, e)
            continue
        log.info("auto_resume: continuing from %s (epoch %s, step %s)", path, state.get("epoch"),
                 state.get("global_step"))
        return str(path)
    return None


# ---------------------------------------------------------------------------------------------- checkpoints
_MOVABLE = ("best_model_path", "kth_best_model_path", "last_model_path")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint whose model-selection state survives a moved run folder.

    Lightning restores ``best_model_score`` (and the best-k bookkeeping) only when the checkpoint's
    ``dirpath`` equals the current one: a run folder moved after a kill (off node-local scratch, off a full
    disk) would resume with no best score, and the first checkpoint after the restart would become "best"
    (val metrics of one epoch beside test metrics of another). Here the saved paths are the run's own
    records, rebased from the folder they were written in to this one (only file names inside it count),
    so the selection goes on as if the folder had never moved. A checkpoint of another run
    (``ckpt_path=<its folder>/last.ckpt``, its best file not here) starts the selection afresh, as before.
    Its state key is ModelCheckpoint's, so checkpoints written before keep restoring."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict) -> None:
        saved, here = state_dict.get("dirpath"), self.dirpath
        if saved and here and os.path.normpath(str(saved)) != os.path.normpath(str(here)):
            moved = rebase_checkpoint_state(state_dict, str(saved), str(here))
            if not moved.get("best_model_path") or os.path.isfile(moved["best_model_path"]):
                state_dict = moved  # this folder holds the run's checkpoints: it was moved (else: another
                # run's checkpoint, ckpt_path=<elsewhere>, whose selection starts afresh here, as Lightning does)
        super().load_state_dict(state_dict)


def rebase_checkpoint_state(state: dict, old: str, new: str) -> dict:
    """ModelCheckpoint's state with every path inside folder ``old`` moved to folder ``new``."""

    def move(path):
        if not path:
            return path
        rel = os.path.relpath(os.path.normpath(str(path)), os.path.normpath(old))
        return path if rel.startswith("..") else os.path.join(new, rel)

    out = {**state, "dirpath": new, **{k: move(state.get(k)) for k in _MOVABLE if k in state}}
    if isinstance(state.get("best_k_models"), dict):
        out["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written as every other file of a run is (``recsys.core.files.write_with``): the bytes go to a
    temp file beside the target, then one rename. A disk that fills mid-write leaves the previous checkpoint
    in place (Lightning's own writer copies a temp file from /tmp into place, and a full disk there leaves a
    truncated ``last.ckpt``); the failure is one line naming the file."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)

        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())

        try:
            write_with(Path(path), fill)
        except OSError as e:
            raise UserError(
                f"{path}: the checkpoint could not be written ({e.strerror or e}); the previous one is kept. Free "
                "space (or make the folder writable), then run the same command again: auto_resume goes on from the "
                "last complete checkpoint (a moved run folder resumes too)") from None


def use_atomic_checkpoints(trainer) -> None:
    """Let ``trainer`` write its checkpoints with :class:`AtomicCheckpointIO` (unless another writer is set)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class ResumeState(Callback):
    """What an exact resume needs beyond Lightning's own restore: the training loaders' position and the
    random number generators.

    - Loaders: Lightning hands a stateful loader (``ResumableLoader``) its saved position only when it
      builds the loaders after the restore; a ``configure_optimizers`` that reads
      ``trainer.estimated_stepping_batches`` (the warm-up schedule) builds them before, so the epoch
      would start again from its first batch. This hands the position over at ``on_train_start`` and
      restarts the loaders' iterators.
    - RNGs (torch, CUDA, numpy, python): saved in each checkpoint and restored at the first training
      batch after the restart, so the draws made while setting up do not shift them: the dropout masks
      of a resumed run are those of the uninterrupted one. Every rank restores rank 0's state, which is
      also what it had (all ranks are seeded alike).
    - Training time: the seconds trained so far go into each checkpoint, so ``time/train_s`` of a resumed
      run is the whole run's (:meth:`train_seconds`), not the time since the restart.
    """

    def __init__(self):
        self._pending: dict | None = None
        self._before = 0.0  # training seconds of the earlier starts of this run (from the checkpoint)
        self._start: float | None = None  # when this start's training began (time.monotonic)
        self._end: float | None = None

    def train_seconds(self) -> float:
        """Training time of the whole run: earlier starts (up to their last checkpoint) plus this one."""
        if self._start is None:
            return self._before
        return self._before + ((self._end if self._end is not None else time.monotonic()) - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        self._end = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._end = time.monotonic(), None
        loop = trainer.fit_loop
        if not getattr(loop, "_combined_loader_states_to_load", None) or loop._combined_loader is None:
            return
        loop._load_combined_loader_states()  # no-op unless restarting mid-epoch
        if loop._data_fetcher is not None:
            iter(loop._data_fetcher)  # the loaders start again, at their restored positions

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {  # tensors and plain values only: checkpoints load with torch.load(weights_only=True)
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
            "train_s": self.train_seconds(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict
        self._before = float(state_dict.get("train_s", 0.0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(tuple(state["python"]))


def wandb_resume_kwargs(run_dir: str | Path) -> dict:
    """``id`` and ``resume`` for a WandbLogger, so a run restarted in its folder continues its wandb run.

    The id is kept in ``<run_dir>/wandb_id.txt`` (rank 0 writes it on the first start).
    """
    path = Path(run_dir) / "wandb_id.txt"
    if path.is_file():
        run_id = path.read_text().strip()
    else:
        import uuid

        run_id = uuid.uuid4().hex[:12]  # wandb's run ids: letters and digits
        if global_rank() == 0:
            write_text(path, run_id + "\n")
    return {"id": run_id, "resume": "allow"}


# ---------------------------------------------------------------------------------------------- SLURM requeue
class SlurmRequeue(Callback):
    """The one requeue mechanism on SLURM (``hydra/launcher=slurm`` asks SLURM for ``--signal=USR1@<delay>``;
    submitit does not requeue): on USR1, at the end of the training step under way, every rank saves
    ``<run folder>/hpc_ckpt_<n>.ckpt`` (Lightning's name and folder for it), rank 0 calls
    ``scontrol requeue <job>``, and the run stops (exit 143). The requeued job runs the same command in the
    same folder and ``auto_resume`` continues from the newest checkpoint, this one.

    Lightning's own auto-requeue saves from inside the signal handler, in the middle of a step, where the
    loaders' position and the step counter disagree (the resumed run trains on other batches); it is
    switched off (``SLURMEnvironment(auto_requeue=False)``, :func:`slurm_plugins`). The ranks agree on
    the step to stop at through an all-reduce of the flag at each step end (only inside a SLURM job).
    """

    def __init__(self, signum: int = 10):  # 10: SIGUSR1
        self.signum = signal.Signals(signum)
        self._received = False
        self._active = False

    def _handler(self, signum, frame) -> None:
        self._received = True

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        self._active = SLURMEnvironment.detect()
        if self._active:
            signal.signal(self.signum, self._handler)  # Lightning restores its saved handlers at teardown

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        flag = torch.tensor(float(self._received), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if not flag.item():
            return
        from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        path = trainer.strategy.broadcast(_CheckpointConnector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            code = subprocess.call(["scontrol", "requeue", job])
            log.warning("%s: saved %s at step %d; scontrol requeue %s -> %s", self.signum.name, path,
                        trainer.global_step, job, "requeued" if code == 0 else f"failed ({code})")
        raise SIGTERMException  # job_scope: exit 143 (SLURM ends the job anyway on requeue)


# ---------------------------------------------------------------------------------------------- FSDP2 (trainer=fsdp2)
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2; the module shards itself in ``configure_model``,
    ``RecModule.configure_model``) whose checkpoints gather only the trainable weights: Lightning's own gathers
    the whole model on rank 0 (the frozen backbone too, 15 GB for a bf16 7B) before ``on_save_checkpoint`` drops
    it. Loading a checkpoint hands its ``state_dict`` on to ``on_load_checkpoint`` (which checks that it holds
    every trainable weight); Lightning's would drop it once loaded."""

    def __init__(self, data_parallel_size="all", tensor_parallel_size=1, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self._data_parallel_size == "all":  # every rank of every node (Lightning's "auto": one a node)
            self._data_parallel_size = self.world_size // int(self._tensor_parallel_size)

    def lightning_module_state_dict(self) -> dict:
        out = {}
        for name, p in self.lightning_module.named_parameters():  # every rank: full_tensor gathers
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                if self.global_rank == 0:
                    out[name] = full.detach().cpu()
        return out

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = self.broadcast(checkpoint_path)
        weights = {}
        if Path(path).is_file():
            weights = torch.load(path, mmap=True, map_location="cpu", weights_only=bool(weights_only))["state_dict"]
        out = super().load_checkpoint(path, weights_only=weights_only)
        out.setdefault("state_dict", weights)
        return out


def sharded_loading(cfg) -> bool:
    """Whether the run's trainer loads the backbone rank by rank (``trainer=fsdp2``: an FSDP2 strategy)."""
    strategy = (cfg.get("trainer") or {}).get("strategy") or {}
    target = str(strategy.get("_target_", "")) if hasattr(strategy, "get") else ""
    return target.endswith(("FSDP2Strategy", "ModelParallelStrategy"))


def slurm_plugins() -> list:
    """Inside a SLURM job, Lightning's cluster environment without its own auto-requeue (see SlurmRequeue)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
