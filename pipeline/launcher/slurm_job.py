"""`kiln launch slurm`: fill launch/slurm.sbatch for this job, check it, and sbatch it (or print it)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.config import KilnError
from pipeline.launcher.common import check_train, script


def render(command: list[str], *, nodes: int, gpus_per_node: int, time_limit: str | None = None,
           partition: str | None = None, account: str | None = None, job_name: str | None = None,
           cpus_per_task: int | None = None, env: dict[str, str] | None = None) -> str:
    check_train(command, nodes * gpus_per_node, data=False)
    text = script("slurm.sbatch").read_text()
    values = {"nodes": nodes, "gpus-per-node": gpus_per_node, "time": time_limit, "partition": partition,
              "job-name": job_name, "cpus-per-task": cpus_per_task}
    for key, value in values.items():
        if value is not None:
            text = re.sub(rf"^#SBATCH --{key}=.*$", f"#SBATCH --{key}={value}", text, count=1, flags=re.M)
    if account:
        text = text.replace("#SBATCH --requeue", f"#SBATCH --account={account}\n#SBATCH --requeue", 1)
    text = text.replace('GPUS_PER_NODE="${GPUS_PER_NODE:-8}"', f'GPUS_PER_NODE="${{GPUS_PER_NODE:-{gpus_per_node}}}"')
    setup = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    setup += f"set -- {shlex.join(command)}"
    return re.sub(r"^# KILN_COMMAND.*$", lambda _: setup, text, count=1, flags=re.M)


def launch(text: str, dry_run: bool, script_dir: str = "logs") -> dict:
    if dry_run:
        print(text, end="")
        return {"launcher": "slurm", "script": text}
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
