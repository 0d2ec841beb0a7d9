"""What every launcher checks before starting processes: layout vs world size, master address, env,
and that no option, command word or environment value holds a control character (a newline in a
value that reaches a job script or an env file would start a new shell line)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
import unicodedata
from pathlib import Path

from pipeline.config import ConfigError, KilnError, RunConfig, validate_world
from pipeline.console import log

SCRIPTS = Path(__file__).resolve().parent / "scripts"  # package data; a checkout's launch/ links to them


def script(name: str) -> Path:
    path = SCRIPTS / name
    if not path.exists():
        raise KilnError(f"{path}: launch script not found (the installed package lacks its scripts/)")
    return path


def refuse_control(what: str, value: str) -> None:
    """ConfigError naming `what` when `value` holds a control character (newline, CR, tab, NUL, ...)."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ConfigError(f"{what} {value[:60]!r}: contains a control character ({bad!r}); launch values "
                          "end up in job scripts and env files, where it would start a new shell line")


def check_launch_values(options: dict, command: list[str], env: dict[str, str]) -> None:
    """Every string a launcher puts into a script, an env file or a command line."""
    for name, value in options.items():
        if isinstance(value, str):
            refuse_control(f"--{name.replace('_', '-')}", value)
    for word in command:
        refuse_control("the command word", word)
    for name, value in env.items():
        refuse_control(f"--env {name}", value)


def parse_env(items: list[str] | None) -> dict[str, str]:
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"--env {item}: expected NAME=value")
        env[name] = value
    return env


def strip_dashdash(command: list[str]) -> list[str]:
    command = list(command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("no command to launch: put it after `--`, e.g. -- kiln train --config F")
    return command


def check_train(cfg: RunConfig | None, world_size: int, data: bool | str = True) -> None:
    """Refuse, before launching, a `kiln train` (its parsed RunConfig; None: the command is something else,
    nothing to check) that cannot run: a layout that does not fit the world and (with `data`: on nodes that
    see the files) missing/mixed corpora, a vocab too small, a changed model shape or data under an --out
    that holds checkpoints. `data="if-visible"`: only when every data path exists here (a SLURM login
    node may not mount the data)."""
    if cfg is None:
        return
    if data == "if-visible" and not all(Path(p).exists() for p in cfg.data.paths):
        log.warning("data.paths are not all visible on this host; the ranks check them when they start")
        data = False
    if not data:
        validate_world(cfg, world_size)
        return
    from pipeline.preflight import preflight

    preflight(cfg, world_size)


def check_master(addr: str, port: int, node_rank: int, wait_s: float = 30.0) -> None:
    """Node 0: the port must be free here. Other nodes: the master must answer within wait_s."""
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror:
        raise KilnError(f"--master-addr {addr}: cannot resolve this host name") from None
    if not 0 < port < 65536:
        raise ConfigError(f"--master-port {port}: not a TCP port")
    if node_rank == 0:
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                raise KilnError(f"--master-port {port}: already in use on this node (another job?)") from None
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise KilnError(
                    f"master {addr}:{port} unreachable after {wait_s:.0f}s "
                    "(is node 0 started? is the port open between nodes?)"
                ) from None
            time.sleep(0.5)


def launch_env(extra: dict[str, str]) -> dict[str, str]:
    """The variables launch/env.sh sets on this node, plus --env overrides (env.sh is the one source)."""
    probe = (
        f"source {shlex.quote(str(script('env.sh')))}; "
        'for v in $KILN_ENV_VARS; do if [[ -n "${!v:-}" ]]; then printf "%s=%s\\n" "$v" "${!v}"; fi; done'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True, env={**os.environ, **extra})
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a launcher in the foreground and hand back its exit status."""
    return subprocess.call(cmd, env={**os.environ, **(env or {})})
