"""Paths read from files other people can write: confined to the directory they describe.

A manifest's `tokenizer.path`, a SHA256SUMS entry, a Hugging Face `state.json` data file, a
registry tag used as a cache directory name: each names a file *inside* a directory. Such a name
may not be absolute, may not contain `..`, may not leave the directory through a symlink, and
(for files Kiln reads) must be a regular file, not /dev/zero or a FIFO. The answer is the same
whether an outside file exists or not, so a refusal tells nothing about the rest of the disk.

This is the one place the rule lives; callers raise their own one-line error naming the file
that held the name: `if why := escapes(d, name): raise KilnError(f"{sums}: {name!r} {why}")`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath


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
