"""Process groups for the multi-process CPU tests' worker scripts (fsdp_lora_worker.py, sharded_load_worker.py):
``spawn(worker, ranks, *args)`` starts ``ranks`` processes on a free port, each in an initialised gloo group, and
runs ``worker(rank, world, *args)`` in each."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run(rank: int, worker, world: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()  # every rank done before any tears the group down (else gloo may abort at exit)
    finally:
        dist.destroy_process_group()


def spawn(worker, ranks: int, *args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(worker, ranks, port, args), nprocs=ranks, join=True)
