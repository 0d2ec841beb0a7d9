"""`kiln launch ray`: submit a command (usually `kiln prep`) to a Ray cluster's job API.

SECURITY: Ray's job API runs any code it is sent and has no authentication. A
cluster head's dashboard/jobs port belongs on a private network (or an SSH tunnel).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from pipeline.config import KilnError, first_line

EXCLUDES = [".git", ".venv", "runs", "demo_out", "mlruns", "mlartifacts", "*.db", "logs", "__pycache__"]


def plan(command: list[str], *, address: str | None = None, working_dir: str = ".",
         env: dict[str, str] | None = None, pip: list[str] | None = None) -> dict:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    runtime_env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = env
    if pip:
        runtime_env["pip"] = pip
    entrypoint = shlex.join(command)
    cli = ["ray", "job", "submit", "--address", address, "--runtime-env-json", json.dumps(runtime_env), "--", *command]
    return {"launcher": "ray", "address": address, "entrypoint": entrypoint, "runtime_env": runtime_env,
            "equivalent_cli": shlex.join(cli)}


def _submit(client, job: dict, wait_s: float, every_s: float = 10.0) -> str:
    """Submit, waiting (at most `wait_s`, saying so every `every_s`) while the head has no job agent
    yet: a head that just started, or a busy one, registers its agent seconds to minutes later."""
    start = time.monotonic()
    said = start
    while True:
        try:
            return client.submit_job(entrypoint=job["entrypoint"], runtime_env=job["runtime_env"])
        except RuntimeError as err:
            waited = time.monotonic() - start
            if "No available agent" not in str(err) or waited > wait_s:
                raise KilnError(f"Ray job API at {job['address']}: {first_line(err)}"
                                + (f" (waited {waited:.0f}s for a job agent)" if waited > wait_s else "")) from None
            if time.monotonic() - said >= every_s:
                said = time.monotonic()
                print(f"waiting for the job agent of the Ray head at {job['address']} ({waited:.0f}s of at most "
                      f"{wait_s:.0f}s)", file=sys.stderr, flush=True)
            time.sleep(1)


def launch(job: dict, dry_run: bool, detach: bool = False, poll_s: float = 1.0, agent_wait_s: float = 300.0) -> dict:
    if dry_run:
        print(f"# Ray job for {job['address']}")
        print(job["equivalent_cli"])
        return job
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(job["address"])
    except Exception as err:  # noqa: BLE001 - connection errors come in many types
        raise KilnError(f"Ray job API at {job['address']} unreachable: {err}") from None
    job_id = _submit(client, job, agent_wait_s)
    job["job_id"] = job_id
    print(f"submitted Ray job {job_id}")
    print(f"logs: ray job logs {job_id} --address {job['address']} --follow")
    if detach:
        return job
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[shown:], end="", flush=True)
        shown = len(logs)
        if status.is_terminal():
            break
        time.sleep(poll_s)
    job["status"] = str(status.value if hasattr(status, "value") else status)
    if status != JobStatus.SUCCEEDED:
        raise KilnError(f"Ray job {job_id} ended {job['status']}; see `ray job logs {job_id} --address {job['address']}`")
    return job
