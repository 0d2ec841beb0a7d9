"""DeepSpeed hostfiles (`hostname slots=N`): strict parsing with line numbers, include/exclude."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from pipeline.config import ConfigError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)\s+slots=(?P<slots>\d+)$")


def parse_hostfile(path: str | Path) -> OrderedDict[str, int]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: hostfile not found") from None
    hosts: OrderedDict[str, int] = OrderedDict()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected `hostname slots=N`, got {raw.strip()!r}")
        host, slots = match["host"], int(match["slots"])
        if slots < 1:
            raise ConfigError(f"{path}:{number}: slots must be at least 1")
        if host in hosts:
            raise ConfigError(f"{path}:{number}: host {host} listed twice")
        hosts[host] = slots
    if not hosts:
        raise ConfigError(f"{path}: hostfile lists no hosts")
    return hosts


def select(
    hosts: OrderedDict[str, int],
    include: str = "",
    exclude: str = "",
    num_nodes: int | None = None,
    gpus_per_node: int | None = None,
) -> OrderedDict[str, list[int]]:
    """Active {host: [slot ids]} after --include/--exclude (DeepSpeed's own rules) or --num-nodes/--gpus-per-node."""
    if (include or exclude) and (num_nodes or gpus_per_node):
        raise ConfigError("--include/--exclude cannot be combined with --num-nodes/--gpus-per-node")
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    try:
        active = parse_inclusion_exclusion(dict(hosts), include, exclude)
    except ValueError as err:
        raise ConfigError(f"--include/--exclude: {err}") from None
    active = OrderedDict((h, list(s)) for h, s in active.items())
    if num_nodes:
        if num_nodes > len(active):
            raise ConfigError(f"--num-nodes {num_nodes}: the hostfile has only {len(active)} hosts")
        active = OrderedDict(list(active.items())[:num_nodes])
    if gpus_per_node:
        for host, slots in active.items():
            if gpus_per_node > len(slots):
                raise ConfigError(f"--gpus-per-node {gpus_per_node}: host {host} has only {len(slots)} slots")
            active[host] = slots[:gpus_per_node]
    return active
