"""Config files as YAML: parsed with bounds, `extends:` resolved, `--set` values parsed.

A config is the user's instructions, but a config file is still a file: the user may name one in a
shared folder, where someone else can write it or plant what it extends. So parsing is bounded (size,
nesting, values after aliases *and merge keys* are expanded) and `extends:` follows a trust rule:

- The file named on the command line is opened as named (links followed: the user chose it), but it
  must be a regular file (a FIFO would hang the read) of at most MAX_YAML_BYTES.
- A file whose owner is the user (or root) and which sits in a directory of theirs that others cannot
  write (ssh's StrictModes rule) is *the user's own*: its `extends:` names any file relative to it,
  `../model/base.yaml` included, as the shipped configs do.
- Any other file (another user's, or one in a world-writable folder such as /tmp) may only extend files
  beside it: opened through `data_prep/confine.py` (no absolute path, no `..`, no symlink, regular files
  only), since its author, not the user, chose the name.
- At most MAX_EXTENDS files are read for one config (depth and fan-out together); a cycle is refused.
"""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from data_prep.confine import read_confined
from data_prep.errors import ConfigError, KilnError, clip

MAX_YAML_BYTES = 1 << 20  # a config file or --set value
MAX_YAML_VALUES = 100_000  # scalars + containers after alias expansion (a "billion laughs" stops here)
MAX_EXTENDS = 16  # files one config pulls in through `extends:`, all levels together


class _MergeBomb(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts the key/value pairs merge keys (`<<: *base`) copy into mappings while it
    builds them: unlike an alias, which shares one object, each merge copies, so a few KB of merges of one
    large anchor would allocate millions of entries before the finished data could be counted."""

    def __init__(self, stream):
        super().__init__(stream)
        self.pairs = 0

    def flatten_mapping(self, node):
        super().flatten_mapping(node)
        self.pairs += len(node.value)
        if self.pairs > MAX_YAML_VALUES:
            raise _MergeBomb


def deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def safe_yaml(text: bytes, where: str) -> Any:
    """yaml.safe_load with bounds: input size, nesting, and the number of values after aliases and merge
    keys are expanded (a few hundred bytes of nested aliases would otherwise stand for billions of values)."""
    too_many = f"{where}: expands to more than {MAX_YAML_VALUES:,} values (YAML aliases or merge keys?); not a config"
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_YAML_BYTES >> 10} KiB; not a config")
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except _MergeBomb:
        raise ConfigError(too_many) from None
    except yaml.YAMLError as err:
        if where.startswith("--set"):
            raise
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(clip(f"{where}{line}: not valid YAML: {getattr(err, 'problem', err)}")) from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply; not a config") from None
    seen, stack = 0, [data]
    while stack:  # counts a value once per reference, as everything that walks the data later would
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(too_many)
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], yaml-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected key=value")
    try:
        value = safe_yaml(raw.encode(), f"--set {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


# --------------------------------------------------------------------------- files and extends:


def load_yaml(path: str | Path) -> dict:
    """Read the config file the user named, resolving `extends:` (a path or a list of them, relative to
    the file; later files and the file itself win)."""
    path = Path(path)
    text, own = _read_named(path, str(path))
    return _resolve(path, text, own, (), [MAX_EXTENDS])


def _read_named(path: Path, what: str) -> tuple[bytes, bool]:
    """(the file's bytes, whether it is the user's own): links followed, a regular file, bounded. `what`
    starts the error line (the file, or the `extends:` that names it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{what}: no such config file") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what}: not a regular file; not a config")
        return f.read(MAX_YAML_BYTES + 1), _owned(st) and _owned(os.stat(Path(path).resolve().parent))


def _owned(st: os.stat_result) -> bool:
    """Owned by this user or root and not writable by others: nobody else chose what it says."""
    return st.st_uid in (os.geteuid(), 0) and not st.st_mode & stat.S_IWOTH


def _read_extended(path: Path, name: str, own: bool) -> tuple[Path, bytes, bool]:
    """The file `name` that `path`'s `extends:` names: (its path, its bytes, whether it is the user's own)."""
    what = f"{path}: extends: {name!r}"
    if own:
        target = path.parent / name
        return (target, *_read_named(target, what))
    try:
        text = read_confined(path.parent, name, f"{path}: extends:", MAX_YAML_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such config file") from None
    except KilnError as err:
        raise ConfigError(f"{err} (the file is writable by others or not yours, so it may only extend files "
                          "beside it)") from None
    target = path.parent / name
    return target, text, _owned(os.stat(target)) and _owned(os.stat(target.parent))


def _resolve(path: Path, text: bytes, own: bool, chain: tuple[Path, ...], budget: list[int]) -> dict:
    data = safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) and p for p in parents):
        raise ConfigError(f"{path}: extends: expected a file name or a list of file names")
    chain = (*chain, path.resolve())
    merged: dict = {}
    for name in parents:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"{path}: extends: more than {MAX_EXTENDS} files for one config; not a config")
        target, parent_text, parent_own = _read_extended(path, name, own)
        if target.resolve() in chain:
            raise ConfigError(f"{path}: extends: cycle through {' -> '.join(str(p) for p in (*chain, target))}")
        merged = deep_merge(merged, _resolve(target, parent_text, parent_own, chain, budget))
    return deep_merge(merged, data)
