"""Paths read from files other people can write: confined to the directory they describe.

A manifest's `tokenizer.path`, a SHA256SUMS entry, a Hugging Face `state.json` data file, a
registry tag used as a cache directory name: each names a file *inside* a directory. Such a name
may not be absolute, may not contain `..`, may not leave the directory through a symlink, and
(for files Kiln reads) must be a regular file, not /dev/zero or a FIFO. The answer is the same
whether an outside file exists or not, so a refusal tells nothing about the rest of the disk.

This is the one place the rule lives: `open_confined` is how every such name is opened (manifest
shards and their partner files, SHA256SUMS entries, MODEL and checkpoint dir files, fetched dirs);
`escapes` is the check alone, for names that are not opened here (a cache directory name).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from data_prep.errors import KilnError


def escapes(base: str | Path, name: str, regular_file: bool = True) -> str | None:
    """Why `name` (read from a file under `base`) may not be opened as base/name, or None when it may.

    A name that does not exist yet is allowed (the caller reports it missing); one that exists must
    be a regular file when `regular_file`."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "is not a file name"
    if PurePosixPath(name).is_absolute() or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "contains '..'"
    root = Path(base).resolve()
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        return f"leaves {base} through a symlink"
    if regular_file:
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(mode):
            return "is not a regular file"
    return None


def open_confined(base: str | Path, name: str, origin: str) -> BinaryIO:
    """`base/name` opened for reading (binary), for a `name` read from a file under `base` (`origin`, e.g.
    "DIR/manifest.json: shards[].path", starts the error line). The one way Kiln opens a file a stranger
    named: the name must pass `escapes`; every component is opened relative to the last without following
    a link (O_NOFOLLOW, so nothing can be swapped for a link between check and open); the file must be a
    regular file, opened O_NONBLOCK so that a FIFO is refused instead of hanging. FileNotFoundError when
    it is missing (callers say so in their words); KilnError naming `origin` and the name otherwise.
    `base` itself is the user's (given on the command line) and may be reached through links."""
    import errno
    import fcntl

    if why := escapes(base, name, regular_file=False):
        raise KilnError(f"{origin} {name!r} {why}; refusing it")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nxt = os.open(part, nofollow | (os.O_NONBLOCK if last else os.O_DIRECTORY), dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise KilnError(f"{origin} {name!r} is or passes through a symlink (links are not followed); "
                                "refusing it") from None
            os.close(fd)
            fd = nxt
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KilnError(f"{origin} {name!r} is not a regular file; refusing it")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        f, fd = os.fdopen(fd, "rb"), -1
        return f
    finally:
        if fd >= 0:
            os.close(fd)


def read_confined(base: str | Path, name: str, origin: str, limit: int) -> bytes:
    """The whole of `base/name` (open_confined), refused before reading when larger than `limit` bytes."""
    with open_confined(base, name, origin) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise KilnError(f"{origin} {name!r} is {size} bytes, more than the {limit}-byte limit; refusing it")
        return f.read(limit + 1)[:limit]
