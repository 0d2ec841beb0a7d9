"""Environment values that reach the nodes' processes without being on any command line.

DeepSpeed's pdsh runner forwards every variable whose name starts with one of its prefixes (MLFLOW,
PYTHON, MV2, UCX and the accelerator's, e.g. NCCL) by writing `export NAME=VALUE;` into the line pdsh
hands to each node's shell: an argv that `ps` shows to every user of the launching host and of every
node, and that pdsh, sshd and DeepSpeed's own log print. `MLFLOW_TRACKING_PASSWORD` and
`MLFLOW_TRACKING_TOKEN` are among them.

So for a launch over several hosts Kiln takes every such variable (except PYTHONPATH, which names
directories and which the node's Python needs to find Kiln) out of the runner's environment and writes
them to ENV_FILE in the working directory, which every node `cd`s to (DeepSpeed assumes it is shared):
created by this user alone, mode 0600, replaced atomically, removed when the job ends — and, should the
launching `kiln` be killed (SIGKILL included) before it can remove it, by a watchdog process in its own
session that waits for the launcher to end (`guard`: end-of-file on a pipe only the launcher holds). Each rank
starts as `python -m pipeline.launcher.node_env FILE -- COMMAND...`, which reads the file only if it
is a regular file of this user's that nobody else may read, sets the values and execs COMMAND.
What stays on the command line is `.deepspeed_env` (Kiln-checked values, no credentials) and PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ENV_FILE = ".kiln-node-env"
MAX_BYTES = 1 << 20


def carried(environ: dict[str, str], prefixes: list[str], deepspeed_env: dict[str, str]) -> dict[str, str]:
    """The variables DeepSpeed would put on the nodes' command line that go through ENV_FILE instead:
    those of `environ` with one of its export `prefixes` (PYTHONPATH and names Kiln puts in
    `.deepspeed_env` aside), and every MLFLOW_* of `.deepspeed_env` (an `--env` credential)."""
    out = {k: v for k, v in environ.items()
           if k.startswith(tuple(prefixes)) and k != "PYTHONPATH" and k not in deepspeed_env}
    out.update({k: v for k, v in deepspeed_env.items() if k.startswith("MLFLOW")})
    return out


def wrap(command: list[str], path: Path) -> list[str]:
    """`command` as each rank starts it: loading `path` first."""
    return [sys.executable, "-m", "pipeline.launcher.node_env", str(path), "--", *command]


def write(values: dict[str, str], path: Path) -> None:
    """`values` into `path` (JSON), readable by this user only, created under a fresh name and renamed
    over `path` (a link planted there is replaced, not followed)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", dir=path.parent)  # O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read(path: str) -> dict[str, str]:
    """The values of ENV_FILE, on a node: a regular file of this user's, not a link, private, bounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise SystemExit(f"kiln node env: error: {path}: cannot open ({err.strerror}); is the working "
                         "directory shared with the launching host?") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise SystemExit(f"kiln node env: error: {path}: not a private regular file of this user's; "
                             "refusing it")
        data = json.loads(f.read(MAX_BYTES))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise SystemExit(f"kiln node env: error: {path}: not a JSON object of strings; refusing it")
    return data


def guard(path: Path) -> int:
    """A watchdog that removes `path` once this process has ended, however it ended (SIGKILL included), unless
    `path` was replaced meanwhile (another launch's file). It holds the read end of a pipe whose only write
    end is the returned descriptor, open in this process alone: when this process dies, or closes it, the
    watchdog reads end-of-file. In its own session: a kill of the launcher's process group does not take it
    along (a kill of the whole cgroup, as a scheduler does, does)."""
    st = os.lstat(path)
    read_end, write_end = os.pipe()  # (not inherited by the job's processes: Python's fds are non-inheritable)
    try:
        subprocess.Popen([sys.executable, "-m", "pipeline.launcher.node_env", "--remove-after", str(read_end),
                          f"{st.st_dev}:{st.st_ino}", str(path)], start_new_session=True, pass_fds=(read_end,),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end


def remove_after(fd: int, identity: str, path: str) -> None:
    """Wait for end-of-file on `fd` (the launcher has ended or let go), then unlink `path` if it is still the
    file `identity` (st_dev:st_ino) names."""
    while os.read(fd, 1):
        pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if f"{st.st_dev}:{st.st_ino}" == identity:
        os.unlink(path)


def main(argv: list[str]) -> None:
    if len(argv) == 4 and argv[0] == "--remove-after":
        remove_after(int(argv[1]), argv[2], argv[3])
        return
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m pipeline.launcher.node_env FILE -- COMMAND...")
    os.environ.update(read(argv[0]))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
