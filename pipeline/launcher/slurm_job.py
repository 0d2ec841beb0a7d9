"""`kiln launch slurm`: fill launch/slurm.sbatch for this job, check it, and sbatch it (or print it).

Values are placed by whole lines, never through a regex replacement (whose escapes would turn a
literal `\\n` into a new script line): `#SBATCH` values must be single words without control
characters, `--time` a SLURM time, and the environment and command are shell-quoted (shlex).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.config import ConfigError, KilnError, RunConfig
from pipeline.launcher.common import check_train, refuse_control, script

# minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]], or no limit
SLURM_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|unlimited|infinite", re.I)


def _directive(key: str, value) -> str:
    text = str(value)
    refuse_control(f"--{key}", text)
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"--{key} {text!r}: must be one word (it becomes `#SBATCH --{key}=...`)")
    if key == "time" and not SLURM_TIME.fullmatch(text):
        raise ConfigError(f"--time {text!r}: not a SLURM time (MM, HH:MM:SS, D-HH:MM:SS or UNLIMITED)")
    return f"#SBATCH --{key}={text}"


def render(command: list[str], *, nodes: int, gpus_per_node: int, time_limit: str | None = None,
           partition: str | None = None, account: str | None = None, job_name: str | None = None,
           cpus_per_task: int | None = None, env: dict[str, str] | None = None,
           train: RunConfig | None = None) -> str:
    """The job script; `train`: the launched `kiln train`'s RunConfig (None: another command)."""
    check_train(train, nodes * gpus_per_node, data=False)
    values = {"nodes": nodes, "gpus-per-node": gpus_per_node, "time": time_limit, "partition": partition,
              "job-name": job_name, "cpus-per-task": cpus_per_task, "account": account}
    given = {key: _directive(key, value) for key, value in values.items() if value is not None}
    for name, value in (env or {}).items():
        refuse_control(f"--env {name}", value)
    for word in command:
        refuse_control("the command word", word)
    lines = []
    for line in script("slurm.sbatch").read_text().splitlines():
        key = line[len("#SBATCH --"):].split("=", 1)[0] if line.startswith("#SBATCH --") else None
        if key in given:
            line = given.pop(key)
        elif line == "#SBATCH --requeue" and "account" in given:
            lines.append(given.pop("account"))
        elif line.startswith("# KILN_COMMAND"):
            lines += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
            line = f"set -- {shlex.join(command)}"
        elif line == 'export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"':
            line = f'export GPUS_PER_NODE="${{GPUS_PER_NODE:-{int(gpus_per_node)}}}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def launch(text: str, dry_run: bool, script_dir: str = "logs", train: RunConfig | None = None,
           world_size: int = 0) -> dict:
    if dry_run:
        print(text, end="")
        return {"launcher": "slurm", "script": text}
    check_train(train, world_size, data="if-visible")  # a shared filesystem: checked before the job queues
    if shutil.which("sbatch") is None:
        raise KilnError("sbatch not found: run `kiln launch slurm` on a SLURM login node, or add --dry-run")
    path = Path(script_dir) / f"kiln-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise KilnError(f"sbatch {path}: {out.stderr.strip() or 'failed'}")
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted SLURM job {job_id}: {path}; logs in logs/kiln-{job_id}.out")
    return {"launcher": "slurm", "job_id": job_id, "script_path": str(path)}
