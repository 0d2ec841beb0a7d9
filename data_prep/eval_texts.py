"""Evaluation texts to decontaminate against: what `kiln prep --decontaminate PATH...` reads.

A PATH is a file or a directory (walked in sorted order):
- `.jsonl` / `.json` (one JSON value or JSON lines): every string value of every record, at any
  depth, is an evaluation text (questions, passages, choices, answers: whatever the schema calls them);
- `.txt`: the whole file is one text;
- `.yaml` / `.yml`: an lm-evaluation-harness task with local data (`dataset_path: json`,
  `dataset_kwargs: {data_files: ...}`); its files are read as jsonl, paths relative to the YAML
  and confined to its directory. A task on a hub dataset is refused: nothing is downloaded.
Each file is one *source* (its path relative to the PATH's parent, or `task:<name>` for a task),
the name its removals are counted under. Eval files are input like any other: size-bounded, and a
bad one is a one-line error naming the file and line (decontaminating against half a benchmark
would silently train on the rest).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from data_prep.confine import escapes, open_confined
from data_prep.errors import ConfigError, KilnError

SUFFIXES = (".jsonl", ".json", ".txt", ".yaml", ".yml")
MAX_YAML_BYTES = 1 << 20


def read_sources(paths: list[str], max_bytes: int) -> list[dict]:
    """[{"source", "sha256", "texts"}] for every evaluation file under `paths`, in a fixed order."""
    out = []
    for given in paths:
        root = Path(given)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not files:
                raise ConfigError(f"--decontaminate {given}: no {'/'.join(SUFFIXES)} files in this directory")
        elif root.is_file():
            files = [root]
        else:
            raise ConfigError(f"--decontaminate {given}: no such file or directory")
        for f in files:
            label = f.relative_to(root.parent).as_posix()
            if f.suffix.lower() in (".yaml", ".yml"):
                out.append(_task(f, max_bytes))
            else:
                data = _read(f, max_bytes)
                out.append({"source": label, "sha256": hashlib.sha256(data).hexdigest(), "texts": _texts(f, data)})
    return out


def _read(path: Path, max_bytes: int) -> bytes:
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(f"{path}: {size:,} bytes is over decontaminate.max_bytes ({max_bytes:,})")
    return path.read_bytes()


def _texts(path: Path, data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [text]
    if suffix == ".json":  # one JSON value, or (as lm-eval's json loader accepts) JSON lines
        try:
            return _strings(json.loads(text))
        except (ValueError, RecursionError):
            pass
    texts = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            texts.extend(_strings(_json(line, f"{path}:{n}")))
    return texts


def _json(text: str, where) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{where}: not valid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _strings(value) -> list[str]:
    """Every string inside a JSON value, depth first (iterative: nesting depth cannot overflow)."""
    out, stack = [], [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, list):
            stack.extend(reversed(v))
    return out


class _TaskLoader(yaml.SafeLoader):
    """YAML for lm-eval task files: their `!function` tags read as null; aliases refused (no bombs)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("aliases are not allowed in a task file")
        return super().compose_node(parent, index)


_TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _task(path: Path, max_bytes: int) -> dict:
    raw = _read(path, min(max_bytes, MAX_YAML_BYTES))
    try:
        spec = yaml.load(raw, Loader=_TaskLoader) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not a readable task file: {str(err).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a task file must be a mapping")
    name = str(spec.get("task") or path.stem)
    if spec.get("dataset_path") != "json":
        raise ConfigError(f"{path}: dataset_path: {spec.get('dataset_path')!r} is not local data; decontamination "
                          f"reads local files only (dataset_path: json with dataset_kwargs.data_files)")
    files = (spec.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    elif isinstance(files, str):
        files = [files]
    if not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{path}: dataset_kwargs.data_files: expected a file, a list or a split mapping of files")
    digest, texts = hashlib.sha256(raw), []
    for f in files:
        data_path, data = _read_data_file(path, f, max_bytes)
        digest.update(data)
        texts += _texts(data_path, data)
    return {"source": f"task:{name}", "sha256": digest.hexdigest(), "texts": texts}


def _read_data_file(task: Path, name: str, max_bytes: int) -> tuple[Path, bytes]:
    """A task's data file, opened through data_prep/confine.py: relative, inside the task's directory,
    no `..`, no link, a regular file, at most `max_bytes`."""
    if escapes(task.parent, name, regular_file=False):
        raise ConfigError(f"{task}: dataset_kwargs.data_files: {name!r} is outside the task's directory")
    try:
        with open_confined(task.parent, name, f"{task}: dataset_kwargs.data_files") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ConfigError(f"{task.parent / name}: {size:,} bytes is over decontaminate.max_bytes ({max_bytes:,})")
            return task.parent / name, f.read(max_bytes + 1)[:max_bytes]
    except FileNotFoundError:
        raise ConfigError(f"{task}: dataset_kwargs.data_files: {name!r}: no such file") from None
    except KilnError as err:
        raise ConfigError(str(err)) from None
