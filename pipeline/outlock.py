"""One run per output directory: an exclusive lock on `--out` for prep, train, distill, quantize, prune.

Two runs writing the same directory destroy each other's work (a second run's start-up sweeps the
first one's temp files and half-written checkpoints). The lock is `flock` on a file next to the
directory (`.NAME.kiln-lock`; next to it because quantize and prune replace the directory whole):
the kernel drops it when the process dies, even by kill -9, so a crash never leaves a stale lock.
The file names the holder, which a refused run quotes; the holder removes it when done (and a run
that locked a file just removed that way tries again, so two runs never hold two different files).

A multi-process job (torchrun, deepspeed, srun) shares one --out: its global rank 0 holds the lock
(pipeline/commands/common.py::locked), since rank 0 is the one that cleans up and publishes; the other ranks wait
for rank 0 in their first collective, so a refused job ends as soon as rank 0 exits.
The lock sits in --out's parent, which may be shared: a lock file or --out that is a symlink, or is
owned by another user, is refused, and the lock file is opened without following links
(`O_NOFOLLOW`), so a planted `.NAME.kiln-lock -> someone's file` is never truncated or written.
flock works on local filesystems and NFSv4/Lustre mounts with locking enabled; on a filesystem
without it the lock cannot exclude a run on another host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import KilnError


def lock_path(out: str | Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f".{out.name}.kiln-lock"


@contextmanager
def locked(out: str | Path, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold the lock on `out` for the duration (a no-op when not `enabled`, e.g. on ranks other than 0);
    KilnError naming the holder when another run has it."""
    if not enabled:
        yield
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_mine(Path(out).absolute(), "--out")
    fd = _acquire(path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it: a waiting run then finds a new file
        os.close(fd)


def _acquire(path: Path, out) -> int:
    """flock the lock file; retry when the file we locked was unlinked by a finishing holder meanwhile."""
    while True:
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise KilnError(f"{out}: in use by another kiln run ({holder}); wait for it to finish or "
                            "choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _check_mine(path: Path, what: str) -> None:
    """Refuse a symlink, or a file or directory of another user, at `path` (absent is fine)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise KilnError(f"{path}: {what} is a symlink; refusing to follow it (its parent may be shared)")
    if st.st_uid != os.geteuid():
        raise KilnError(f"{path}: {what} is owned by another user (uid {st.st_uid}); choose another --out")


def _open_lock(path: Path) -> int:
    """The lock file, created or opened without following a link; it must be a regular file of ours
    with one link (not a hard link to someone's file)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise KilnError(f"{path}: the lock file is a symlink; refusing to follow it (remove it if it is "
                            "yours)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise KilnError(f"{path}: the lock file is not a regular file of yours with one link; refusing to "
                        "write it (remove it if it is yours)")
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}: {info['what']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
