"""The process grid: world = PP x DP x TP, built with DeepSpeed's own topology classes.

`PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` orders ranks with the
model (TP) axis fastest, so TP peers are neighbours (same node). Its
`PipelineParallelGrid` creates the process groups and doubles as the `mpu`
DeepSpeed wants for ZeRO and checkpoint file names.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.config import KilnError, RunConfig, validate_world

# Under NCCL the watchdog thread, not the training loop, sees a collective time out or a peer vanish; by
# default it then kills the process (no Python frame, no message of ours). Mode 2 aborts the communicator
# only: the next wait in the training loop raises, and `train` turns that into its one-line "lost peer"
# message naming this rank, as on gloo. (Only the gloo path can be exercised on a CPU machine.)
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def raise_first(problem: str | None, world: int) -> None:
    """Collective when world > 1: every rank passes what it found wrong (or None) and every rank raises
    KilnError with the first problem any rank found, so all stop with the same one line."""
    if world > 1:
        found: list = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    if problem:
        raise KilnError(problem)


def init_distributed(timeout_s: float = 1800) -> None:
    """Join the launcher's process group, or make a 1-process gloo group when run directly.

    Every collective gives up after `timeout_s` (a hung or dead peer), on the world group and on the
    TP/PP/DP subgroups: DeepSpeed creates those with `new_group()` and no timeout, which torch fills
    from its module default, so that default is set too.
    """
    import deepspeed
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        return
    alone = "RANK" not in os.environ  # plain `kiln train`: DeepSpeed still wants a group
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.update({k: v for k, v in NCCL_ENV.items() if k not in os.environ})
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    if alone:  # an in-process store, no TCP rendezvous; gloo/NCCL talk over loopback (there is no peer)
        loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
        if loopback:
            os.environ.update(GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if backend == "gloo":  # DeepSpeed would JIT-compile a C++ shared-memory op that only its CPU *inference*
        # all-reduce uses: minutes and a compiler on a fresh machine. (`deepspeed.comm.torch` as an attribute
        # is the torch package itself, hence importlib.)
        ds_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_comm, "build_shm_op"):
            ds_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)


@dataclass
class Layout:
    """Where this rank sits in the grid, and the groups it talks to."""

    tp: int
    pp: int
    dp: int
    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    grid: object  # deepspeed PipelineParallelGrid (the mpu)
    topology: object

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    def dropout_seed(self, seed: int) -> int:
        """The default RNG's seed on this rank: the same across a TP group (its activations are replicated,
        so their dropout masks must be too), different across data-parallel replicas and pipeline stages.
        (Attention dropout on a rank's own heads draws from a TP-rank stream: parallelize.py.)"""
        return seed + 100 * self.pp_rank + 1_000_003 * self.dp_rank

    def describe(self) -> str:
        return f"world {self.world} = dp {self.dp} x pp {self.pp} x tp {self.tp}"


def make_layout(cfg: RunConfig) -> Layout:
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    world = dist.get_world_size()
    dp = validate_world(cfg, world)
    topo = PipeModelDataParallelTopology(num_pp=cfg.parallel.pp, num_mp=cfg.parallel.tp, num_dp=dp)
    grid = PipelineParallelGrid(topology=topo)
    coord = topo.get_coord(dist.get_rank())
    return Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, rank=dist.get_rank(), world=world,
                  tp_rank=coord.model, pp_rank=coord.pipe, dp_rank=coord.data, grid=grid, topology=topo)
