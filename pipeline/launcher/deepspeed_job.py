r"""`kiln launch deepspeed`: the DeepSpeed launcher over a hostfile, checked first, printable per node.

The environment reaches every node through `.deepspeed_env`, which DeepSpeed's pdsh runner turns
into `export NAME=VALUE;` in the remote shell, putting a value in double quotes when it holds any
character outside `[\w@%+=:,./-]`. Inside double quotes `$(...)`, backticks and `\` still expand, and
older DeepSpeed versions do not quote at all, so no quoting Kiln could add survives: values are
limited to characters that mean nothing to a shell (SAFE_VALUE) and anything else is refused.

With more than one host the runner hands the launched command to pdsh, which joins the words with
spaces for each node's shell (sshd runs `$SHELL -c`), after `cd CWD;` and `--master_addr=ADDR`,
none of them quoted; DeepSpeed only wraps a word holding a space in double quotes. So the quoting is
Kiln's (`node_words`): every word is handed over already quoted for that shell, and the master address
and working directory must be words no shell would change. The dry run prints the words each node runs.

The same line would carry every MLFLOW_*/PYTHON*/NCCL_* variable of the launching shell, credentials
included, as `export NAME=VALUE;`: over several hosts those travel in a private file instead
(pipeline/launcher/node_env.py), and only its name is on the command line.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, RunConfig
from pipeline.launcher import node_env
from pipeline.launcher.common import check_master, check_train, launch_env
from pipeline.launcher.hostfile import parse_hostfile, select

SAFE_VALUE = re.compile(r"[\w@%+=:,./^-]*")  # DeepSpeed's own "no quoting needed" set, plus ^ (NCCL's ^lo,docker)


def check_deepspeed_env(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not name.isidentifier() or not SAFE_VALUE.fullmatch(value):
            raise ConfigError(f"--env {name}={value[:60]!r}: .deepspeed_env values may hold only letters, digits "
                              "and @%+=:,./^-_ (DeepSpeed's pdsh runner hands them to a shell on every node); "
                              "set this one in the nodes' environment instead")
    return env


def node_words(command: list[str]) -> list[str]:
    """The words to hand DeepSpeed's pdsh runner so that each node's shell gets back exactly `command`:
    single-quoted; a word with a space is escaped for the double quotes DeepSpeed then puts around it."""
    dq = str.maketrans({"\\": "\\\\", "$": "\\$", "`": "\\`"})  # DeepSpeed escapes " itself
    return [w.translate(dq) if " " in w else shlex.quote(w) for w in command]


def check_shell_word(what: str, value: str) -> str:
    """`value` goes unquoted into each node's shell command line: it must be one word a shell leaves alone."""
    if shlex.quote(value) != value:
        raise ConfigError(f"{what} {value[:60]!r}: holds characters a node's shell would interpret (DeepSpeed's "
                          "pdsh runner sends it unquoted); only letters, digits and @%+=:,./_- are allowed")
    return value


def write_deepspeed_env(env: dict[str, str], path: str | Path = ".deepspeed_env") -> None:
    """The file DeepSpeed's runner ships to every node (pdsh), one NAME=VALUE per line."""
    Path(path).write_text("".join(f"{k}={v}\n" for k, v in check_deepspeed_env(env).items()))


def plan(
    command: list[str],
    hostfile: str,
    *,
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
    include: str = "",
    exclude: str = "",
    master_addr: str | None = None,
    master_port: int = 29500,
    env: dict[str, str] | None = None,
    train: RunConfig | None = None,
) -> dict:
    """Everything the launch will do: the deepspeed command, per-node commands, .deepspeed_env. `train`:
    the RunConfig of the `kiln train` being launched (None: another command), checked against the world."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import EXPORT_ENVS, encode_world_info

    active = select(parse_hostfile(hostfile), include, exclude, num_nodes, gpus_per_node)
    world = sum(len(s) for s in active.values())
    check_train(train, world, data=False)
    master = master_addr or next(iter(active))
    hosts = list(active)
    single_local = len(hosts) == 1 and hosts[0] in ("localhost", "127.0.0.1")
    ds = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", master, "--master_port", str(master_port)]
    if include:
        ds += ["--include", include]
    if exclude:
        ds += ["--exclude", exclude]
    if num_nodes:
        ds += ["--num_nodes", str(num_nodes)]
    if gpus_per_node:
        ds += ["--num_gpus", str(gpus_per_node)]
    if single_local:
        ds += ["--no_ssh_check"]
    ds_env, user_command = launch_env(env or {}), command
    carried: dict[str, str] = {}
    if len(hosts) > 1:  # DeepSpeed's runner goes through pdsh and each node's shell
        check_shell_word("--master-addr", master)
        check_shell_word("the working directory", str(Path.cwd()))
        check_shell_word("this Python", sys.executable)
        carried = node_env.carried(dict(os.environ), EXPORT_ENVS + get_accelerator().export_envs(), ds_env)
        ds_env = {k: v for k, v in ds_env.items() if k not in carried}
        command = node_env.wrap(command, Path.cwd() / node_env.ENV_FILE)
    words = node_words(command) if len(hosts) > 1 else command
    ds += ["--no_python", "--no_local_rank", *words]
    world_info = encode_world_info({h: s for h, s in active.items()})
    per_node = {  # the words each node runs (node_words makes its shell get exactly these)
        host: shlex.join(["python", "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                          f"--node_rank={rank}", f"--master_addr={master}", f"--master_port={master_port}",
                          "--no_python", "--no_local_rank", *command])
        for rank, host in enumerate(hosts)
    }
    return {
        "launcher": "deepspeed",
        "world_size": world,
        "nodes": {h: len(s) for h, s in active.items()},
        "master": f"{master}:{master_port}",
        "command": shlex.join(ds),
        "argv": ds,
        "user_command": user_command,
        "per_node": per_node,
        "deepspeed_env": check_deepspeed_env(ds_env),
        "node_env": sorted(carried),  # names only: the job is printed (--json)
        "_node_env": carried,  # the values, taken out by launch()
    }


def launch(job: dict, dry_run: bool, train: RunConfig | None = None) -> dict:
    carried = job.pop("_node_env")
    if dry_run:
        print(f"# deepspeed launcher ({job['world_size']} processes on {len(job['nodes'])} nodes)")
        print(job["command"])
        print("# .deepspeed_env (exported on every node; defaults from launch/env.sh as detected on this node)")
        for k, v in job["deepspeed_env"].items():
            print(f"{k}={v}")
        if job["node_env"]:
            print(f"# {node_env.ENV_FILE} (private to you, read by each rank, values not shown): "
                  + " ".join(job["node_env"]))
        for host, cmd in job["per_node"].items():
            print(f"# on {host}:")
            print(cmd)
        return job
    # data and checkpoint checks only where this host trains too (it sees what the ranks will see)
    here = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
    check_train(train, job["world_size"], data=bool(here & set(job["nodes"])))
    # DeepSpeed's runner ships these to every node (pdsh) from .deepspeed_env in the current directory.
    write_deepspeed_env(job["deepspeed_env"])
    master, port = job["master"].rsplit(":", 1)
    if master in ("localhost", "127.0.0.1"):
        check_master(master, int(port), 0)
    argv = list(job["argv"])
    argv[0] = str(Path(sys.executable).with_name("deepspeed"))
    environ = {k: v for k, v in {**os.environ, **job["deepspeed_env"]}.items() if k not in carried}
    if len(job["nodes"]) == 1:
        job["returncode"] = subprocess.call(argv, env=environ)
        return job
    env_file = Path.cwd() / node_env.ENV_FILE
    node_env.write(carried, env_file)  # always (an empty one too): every rank starts by reading it
    try:
        held = node_env.guard(env_file)  # a watchdog removes it should this process be killed first
    except BaseException:
        env_file.unlink(missing_ok=True)
        raise
    try:
        job["returncode"] = subprocess.call(argv, env=environ)
    finally:
        env_file.unlink(missing_ok=True)
        os.close(held)  # (the watchdog wakes, finds it gone, and exits)
    return job
