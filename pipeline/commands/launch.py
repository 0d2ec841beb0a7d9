"""`kiln launch LAUNCHER -- COMMAND`: validate a multi-node job, then hand it to a launcher.

The launched command is read here, once: a `kiln train` is parsed by `kiln train`'s own arguments
(pipeline/commands/train.py) into its validated RunConfig, and the launcher (pipeline/launcher/) gets that
config with the plain command words it passes on. The launchers never parse a command line themselves.
"""

from __future__ import annotations

import argparse
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

from pipeline.commands import train
from pipeline.commands.common import add_common_options
from pipeline.config import ConfigError, KilnError

NAME = "launch"
HELP = "Launch a multi-node job: deepspeed hostfile, SLURM, torchrun or a Ray job."
DESCRIPTION = "Validate a multi-node job (hostfile, layout vs world size, master) and launch it."
EXAMPLE = ("kiln launch slurm --nodes 2 --gpus-per-node 8 --dry-run -- kiln train --config configs/train/1.3b-2x8.yaml"
           "\n\nRun `kiln launch LAUNCHER --help` for each launcher's options.")
RAY_SECURITY = ("SECURITY: Ray's job API runs any code it is sent and has no authentication; keep a cluster "
                "head's dashboard/jobs port (8265) on a private network or an SSH tunnel, never public.")


def launched_train_config(command: list[str]):
    """The RunConfig (with its --out) of `command` when it is `kiln train ...` (or `python -m pipeline.cli
    train ...`), read as `kiln train` reads its arguments; else None. ConfigError (one line) where that
    `kiln train` would refuse to start."""
    for i, word in enumerate(command[:-1]):
        if (word.endswith("kiln") or word == "pipeline.cli") and command[i + 1] == "train":
            rest = command[i + 2 :]
            break
    else:
        return None
    parser = argparse.ArgumentParser(prog="kiln train")
    parser.set_defaults(command="train")
    train.add_arguments(parser)
    said = StringIO()
    try:
        with redirect_stderr(said), redirect_stdout(said):
            args = parser.parse_args(rest)
    except SystemExit as exit_:  # a usage error (argparse's last line says which), or --help
        lines = said.getvalue().strip().splitlines()
        why = lines[-1] if exit_.code and lines else "it asks for --help"
        raise ConfigError(f"the launched `kiln train` would not start: {why}") from None
    return train.config(args)


# --------------------------------------------------------------------------- the launchers: options and start


def _master(p, default: str | None) -> None:
    p.add_argument("--master-addr", default=default)
    p.add_argument("--master-port", type=int, default=29500)


def _nodes(p) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)


def _deepspeed_options(p) -> None:
    _master(p, None)
    p.add_argument("--hostfile", required=True)
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--include", help="NODE[:SLOT,...][@NODE...] (DeepSpeed syntax)")
    p.add_argument("--exclude", help="NODE[:SLOT,...][@NODE...] (DeepSpeed syntax)")


def _deepspeed(args, command: list[str], env: dict[str, str]) -> dict:
    from pipeline.launcher import deepspeed_job

    cfg = launched_train_config(command)
    job = deepspeed_job.plan(command, args.hostfile, num_nodes=args.num_nodes, gpus_per_node=args.gpus_per_node,
                             include=args.include or "", exclude=args.exclude or "", master_addr=args.master_addr,
                             master_port=args.master_port, env=env, train=cfg)
    return deepspeed_job.launch(job, args.dry_run, train=cfg)


def _torchrun_options(p) -> None:
    _master(p, "127.0.0.1")
    _nodes(p)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv", choices=["static", "c10d"], default="static")
    p.add_argument("--run-id", default="kiln")
    p.add_argument("--wait-master", type=float, default=30.0, help="seconds a node > 0 waits for the master")


def _torchrun(args, command: list[str], env: dict[str, str]) -> dict:
    from pipeline.launcher import torchrun_job

    cfg = launched_train_config(command)
    job = torchrun_job.plan(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, node_rank=args.node_rank,
                            master_addr=args.master_addr, master_port=args.master_port, rdzv=args.rdzv,
                            run_id=args.run_id, env=env, train=cfg)
    return torchrun_job.launch(job, args.dry_run, args.wait_master, train=cfg)


def _slurm_options(p) -> None:
    _nodes(p)
    p.add_argument("--time")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--cpus-per-task", type=int)


def _slurm(args, command: list[str], env: dict[str, str]) -> dict:
    from pipeline.launcher import slurm_job

    cfg = launched_train_config(command)
    text = slurm_job.render(command, nodes=args.nodes, gpus_per_node=args.gpus_per_node, time_limit=args.time,
                            partition=args.partition, account=args.account, job_name=args.job_name,
                            cpus_per_task=args.cpus_per_task, env=env, train=cfg)
    return slurm_job.launch(text, args.dry_run, train=cfg, world_size=args.nodes * args.gpus_per_node)


def _ray_options(p) -> None:
    p.add_argument("--address", help="Ray job API, e.g. http://head:8265 (default: $RAY_ADDRESS or local)")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--pip", action="append", help="extra pip requirement for the job's runtime env")
    p.add_argument("--detach", action="store_true", help="submit and return without streaming logs")


def _ray(args, command: list[str], env: dict[str, str]) -> dict:
    from pipeline.launcher import ray_job

    job = ray_job.plan(command, address=args.address, working_dir=args.working_dir, env=env, pip=args.pip)
    return ray_job.launch(job, args.dry_run, args.detach)


# name: (summary, example, its options, start it: (args, command words, env) -> the job's summary)
LAUNCHERS = {
    "deepspeed": ("DeepSpeed launcher over a hostfile (`hostname slots=N` lines); writes .deepspeed_env, and over "
                  "several hosts .kiln-node-env (0600: your MLFLOW_*/PYTHON*/NCCL_* values, kept off the nodes' "
                  "command line).",
                  "kiln launch deepspeed --hostfile hosts.txt --num-nodes 2 --gpus-per-node 8 --dry-run -- kiln train "
                  "--config configs/train/1.3b-2x8.yaml", _deepspeed_options, _deepspeed),
    "torchrun": ("torchrun on this node (static or c10d rendezvous); run the same on every node with its --node-rank.",
                 "kiln launch torchrun --nodes 2 --gpus-per-node 8 --node-rank 0 --master-addr node0 -- kiln train "
                 "--config configs/train/1.3b-2x8.yaml", _torchrun_options, _torchrun),
    "slurm": ("Render launch/slurm.sbatch (srun + torchrun, requeue on preemption) and sbatch it.",
              "kiln launch slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu --account myproj "
              "--dry-run -- kiln train --config configs/train/1.3b-2x8.yaml", _slurm_options, _slurm),
    "ray": ("Submit a command (usually kiln prep) to a Ray cluster's job API. " + RAY_SECURITY,
            "kiln launch ray --address http://head:8265 -- kiln prep data/raw --out data/prepped --workers 64",
            _ray_options, _ray),
}


def add_arguments(parser) -> None:
    kinds = parser.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    for name, (summary, example, options, _) in LAUNCHERS.items():
        p = kinds.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_options(p, config=False)  # the launched command takes its own --config
        p.add_argument("--dry-run", action="store_true", help="print what would run (per node) and exit")
        p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment (repeatable)")
        options(p)
        p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="what to launch")


def run(args) -> dict:
    from pipeline.launcher import common

    command = common.strip_dashdash(args.job_command)
    env = common.parse_env(args.env)
    common.check_launch_values({k: v for k, v in vars(args).items() if k not in ("job_command", "env")}, command, env)
    job = LAUNCHERS[args.launcher][3](args, command, env)
    if job.get("returncode"):
        raise KilnError(f"{args.launcher} launcher exited with status {job['returncode']}")
    return job
