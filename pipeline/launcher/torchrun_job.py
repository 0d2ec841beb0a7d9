"""`kiln launch torchrun`: launch/torchrun_multinode.sh on this node, checked first, printable per node."""

from __future__ import annotations

import os
import subprocess

from pipeline.config import RunConfig
from pipeline.launcher.common import check_master, check_train, launch_env, run, script


def _env(nodes: int, gpus_per_node: int, node_rank: int, master_addr: str, master_port: int,
         rdzv: str, run_id: str) -> dict[str, str]:
    return {
        "NNODES": str(nodes), "NODE_RANK": str(node_rank), "GPUS_PER_NODE": str(gpus_per_node),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RDZV": rdzv, "RUN_ID": run_id,
    }


def plan(command: list[str], *, nodes: int = 1, gpus_per_node: int = 1, node_rank: int = 0,
         master_addr: str = "127.0.0.1", master_port: int = 29500, rdzv: str = "static",
         run_id: str = "kiln", env: dict[str, str] | None = None, train: RunConfig | None = None) -> dict:
    """Each node's torchrun line; `train`: the launched `kiln train`'s RunConfig (None: another command)."""
    check_train(train, nodes * gpus_per_node, data=False)
    per_node = {}
    for rank in range(nodes):
        vars_ = _env(nodes, gpus_per_node, rank, master_addr, master_port, rdzv, run_id)
        out = subprocess.run(["bash", str(script("torchrun_multinode.sh")), *command], capture_output=True, text=True,
                             env={**os.environ, **(env or {}), **vars_, "DRY_RUN": "1"}, check=True)
        per_node[rank] = out.stdout.strip()
    return {
        "launcher": "torchrun",
        "world_size": nodes * gpus_per_node,
        "node_rank": node_rank,
        "master": f"{master_addr}:{master_port}",
        "per_node": per_node,
        "command": command,
        "env": {**launch_env(env or {}), **_env(nodes, gpus_per_node, node_rank, master_addr, master_port, rdzv, run_id)},
    }


def launch(job: dict, dry_run: bool, wait_master_s: float = 30.0, train: RunConfig | None = None) -> dict:
    if dry_run:
        print(f"# torchrun: {job['world_size']} processes; run on each node:")
        for rank, cmd in job["per_node"].items():
            print(f"# node {rank}:")
            print(cmd)
        return job
    check_train(train, job["world_size"])  # data and checkpoint checks: this node sees the files
    master, port = job["master"].rsplit(":", 1)
    if job["env"]["RDZV"] == "static":
        check_master(master, int(port), job["node_rank"], wait_master_s)
    job["returncode"] = run(["bash", str(script("torchrun_multinode.sh")), *job["command"]], job["env"])
    return job
