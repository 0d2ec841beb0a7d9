"""Plain weights on disk, read and written one tensor at a time.

Three places hold a model's plain (consolidated-name) weights:

    MODEL dir        model.safetensors                 every tensor whole
    MODEL dir        model-0000N-of-0000M.safetensors  every tensor whole, each in one shard (written by one
                     + model.safetensors.index.json    rank at the end of a multi-rank run; transformers' layout)
    checkpoint       weights/rank_NNNNN.safetensors    each rank's own slices (TP shard, ZeRO-3 partition)
    old checkpoint   model.safetensors                 (written by Kiln before sharded checkpoints)

`open_weights(dir)` gives one read-only view of any of them: names, shapes, and `get(name)` which
assembles that one tensor from its slices. Nothing ever loads the whole model: writing a MODEL dir
from a checkpoint (export, the end of training) streams tensor by tensor through `SafetensorsWriter`,
so peak memory is the largest tensor, not the model.

A slice is recorded in its file's safetensors metadata (`kiln_slices`, JSON):
    {name: {"shape": full shape, "tp": [dim, start, stop, padded] | null, "flat": [start, stop] | null}}
`tp`: rows [start, stop) along dim of the full tensor zero-padded to `padded` (tensor parallelism);
`flat`: elements [start, stop) of that TP slice flattened (a ZeRO-3 partition).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch

from data_prep.confine import read_confined
from pipeline.config import KilnError, first_line

SLICES = "kiln_slices"
SHARDS_DIR = "weights"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # {"metadata": {...}, "weight_map": {tensor: shard file}}
_SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
INDEX_MAX = 64 << 20  # bytes of an index read whole

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _DTYPES.items()}


# --------------------------------------------------------------------------- writing


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, hashing the bytes as they go out.

    The header (names, dtypes, shapes, offsets) is written first from the declared entries, so
    only the tensor being written is in memory. The file is byte-for-byte what the format
    describes; `safetensors.safe_open` and `load_file` read it.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self.expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            self.expected.append((name, dtype, tuple(shape)))
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.sha = hashlib.sha256()
        self._put(struct.pack("<Q", len(blob)) + blob)
        self.done = 0

    def _put(self, data) -> None:
        self.file.write(data)
        self.sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, in the order the entries were declared."""
        want = self.expected[self.done]
        if (name, tensor.dtype, tuple(tensor.shape)) != want:
            raise ValueError(f"{self.path}: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, declared {want}")
        if tensor.numel():
            self._put(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.done += 1

    def close(self) -> str:
        """Flush, fsync and close; return the file's sha256 (hex)."""
        if self.done != len(self.expected):
            self.file.close()
            raise ValueError(f"{self.path}: {self.done} of {len(self.expected)} tensors written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.sha.hexdigest()


def write_tensors(path: str | Path, items: Iterable[tuple[str, torch.Tensor]], entries, metadata=None) -> str:
    """Stream `items` (name, tensor), declared in `entries`, into a safetensors file; return its sha256."""
    writer = SafetensorsWriter(path, entries, metadata)
    try:
        for name, tensor in items:
            writer.write(name, tensor)
        return writer.close()
    except BaseException:
        writer.file.close()
        raise


def write_shard(path: str | Path, slices: list[tuple[str, torch.Tensor, dict]]) -> str:
    """One rank's slices of the plain weights: (name, local tensor, {"shape", "tp", "flat"}); returns sha256."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t, _ in slices]
    meta = {"format": "pt", SLICES: json.dumps({name: spec for name, _, spec in slices}, sort_keys=True)}
    return write_tensors(path, ((name, t) for name, t, _ in slices), entries, meta)


def shard_name(i: int, n: int) -> str:
    """The i-th (0-based) of n weight shards, as transformers names them."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_index(path: str | Path, shards: dict[str, list[str]], total_size: int, metadata: dict | None = None) -> None:
    """model.safetensors.index.json for `shards` ({file: tensor names}), the layout transformers reads."""
    index = {"metadata": {"total_size": total_size, **(metadata or {})},
             "weight_map": {n: f for f, names in shards.items() for n in names}}
    Path(path).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- reading


class Weights(ABC):
    """Read-only, lazy: the names and shapes of a model's plain weights, each tensor on demand."""

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    def rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """[start, stop) along `dim` of tensor `name` (within its length there): a rank's tensor-parallel slice.
        Files read only those bytes (safetensors slices), so a rank rebuilding its slices at another layout
        reads its share of the model, not all of it."""
        return self.get(name).narrow(dim, start, stop - start).contiguous()

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def items(self):
        for name in self.names():
            yield name, self.get(name)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Everything in memory at once: for small models and tests only."""
        return dict(self.items())


class DictWeights(Weights):
    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def _read_rows(handle, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) along `dim` of one tensor of an open safetensors file, reading just those bytes."""
    return handle.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)].contiguous()


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise KilnError(f"{path}: not a readable safetensors file ({first_line(err)}); refusing to load it") from None


class FileWeights(Weights):
    """One safetensors file holding every tensor whole (a MODEL dir, an old checkpoint)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _open(self.path)
        self._names = list(self.file.keys())

    def names(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.file.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH[self.file.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self.file.get_tensor(name)

    def rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return _read_rows(self.file, name, dim, start, stop)


def read_index(directory: Path) -> tuple[dict, dict]:
    """(weight_map, metadata) of a directory's model.safetensors.index.json, read confined and bounded."""
    where = directory / INDEX
    try:
        index = json.loads(read_confined(directory, INDEX, f"{directory}:", INDEX_MAX))
    except FileNotFoundError:
        raise KilnError(f"{where}: missing") from None
    except ValueError:
        index = None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata") or {} if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not isinstance(metadata, dict):
        raise KilnError(f"{where}: not a weight index (a JSON object with a non-empty weight_map)")
    return weight_map, metadata


class IndexedWeights(Weights):
    """Whole tensors in shard files named by model.safetensors.index.json (someone else's file: the shards
    must be named as transformers names them, and each must hold exactly the tensors the index maps to it)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        where = self.dir / INDEX
        weight_map, self.metadata = read_index(self.dir)
        self.where: dict[str, str] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or not _SHARD_NAME.fullmatch(file):
                raise KilnError(f"{where}: {name} maps to {file!r}, not a model-NNNNN-of-NNNNN.safetensors shard")
            self.where[name] = file
        self.files = {}
        for file in sorted(set(self.where.values())):
            if (self.dir / file).is_symlink():
                raise KilnError(f"{self.dir / file}: a symlink; refusing it")
            self.files[file] = _open(self.dir / file)
            held, mapped = set(self.files[file].keys()), {n for n, f in self.where.items() if f == file}
            if held != mapped:
                odd = sorted(held ^ mapped)[0]
                raise KilnError(f"{self.dir / file}: holds {sorted(held)[:3]}..., {where} maps {sorted(mapped)[:3]}... "
                                f"to it (first difference: {odd})")

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH[self.files[self.where[name]].get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self.files[self.where[name]].get_tensor(name)

    def rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return _read_rows(self.files[self.where[name]], name, dim, start, stop)


class ShardedWeights(Weights):
    """The per-rank slice files of a checkpoint, assembled one tensor at a time."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        files = sorted(self.dir.glob("rank_*.safetensors"))
        if not files:
            raise KilnError(f"{self.dir}: no rank_*.safetensors weight shards")
        self.files = {f: _open(f) for f in files}
        self.index: dict[str, list[tuple[Path, dict]]] = {}
        for f, handle in self.files.items():
            try:
                slices = json.loads((handle.metadata() or {})[SLICES])
            except (KeyError, ValueError):
                raise KilnError(f"{f}: no readable {SLICES} metadata; not a Kiln weight shard") from None
            for name, spec in slices.items():
                self.index.setdefault(name, []).append((f, spec))

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.index[name][0][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        f, _ = self.index[name][0]
        return _TORCH[self.files[f].get_slice(name).get_dtype()]

    def _slices(self, name: str) -> tuple[int | None, list[tuple[int, int, list[tuple[Path, dict]]]]]:
        """(the TP dim or None, [(start, stop, the files holding that TP slice)] in order), checked to tile the
        tensor's padded length exactly."""
        shape, pieces = self.shape(name), self.index[name]
        tp = pieces[0][1].get("tp")
        by_tp: dict[tuple | None, list[tuple[Path, dict]]] = {}
        for f, spec in pieces:
            if spec["shape"] != list(shape) or (spec.get("tp") is None) != (tp is None):
                raise KilnError(f"{f}: {name} is sliced differently from the other shards")
            by_tp.setdefault(tuple(spec["tp"]) if spec.get("tp") else None, []).append((f, spec))
        if tp is None:
            return None, [(0, shape[0] if shape else 0, by_tp[None])]
        dim, padded = tp[0], tp[3]
        out, at = [], 0
        for (_, start, stop, _), group in sorted(by_tp.items(), key=lambda kv: kv[0][1]):
            if start != at:
                raise KilnError(f"{self.dir}: {name}: rows {at}..{start} of dim {dim} are in no shard")
            out.append((start, stop, group))
            at = stop
        if at != padded:
            raise KilnError(f"{self.dir}: {name}: rows {at}..{padded} of dim {dim} are in no shard")
        return dim, out

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if not shape:  # a scalar: whole in one file
            return self._local(name, (), self._slices(name)[1][0][2])
        return self.rows(name, 0, 0, shape[0])

    def rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Only the TP slices that hold rows of [start, stop) are read (along the slicing dim), and of each only
        those rows (safetensors slices); a ZeRO-3 partition along dim 0 reads just its elements in the range."""
        shape = self.shape(name)
        tdim, slices = self._slices(name)
        if stop <= start:
            return torch.empty((*shape[:dim], 0, *shape[dim + 1:]), dtype=self.dtype(name))
        if tdim is None:
            return self._local(name, shape, slices[0][2], (dim, start, stop))
        parts = []
        for a, b, group in slices:
            local = list(shape)
            local[tdim] = b - a
            if tdim != dim:
                parts.append(self._local(name, tuple(local), group, (dim, start, stop)))
            elif max(start, a) < min(stop, b):
                parts.append(self._local(name, tuple(local), group, (dim, max(start, a) - a, min(stop, b) - a)))
        out = torch.cat(parts, dim=tdim)
        return (out.narrow(tdim, 0, shape[tdim]) if tdim != dim else out).contiguous()

    def _local(self, name: str, shape: tuple[int, ...], group: list[tuple[Path, dict]],
               span: tuple[int, int, int] | None = None) -> torch.Tensor:
        """One TP slice of `shape` (rows [start, stop) along dim of it with `span` = (dim, start, stop)): whole in
        one file, or a ZeRO-3 partition per rank (flat ranges, concatenated)."""
        dim, start, stop = span or (0, 0, shape[0] if shape else 0)
        if group[0][1].get("flat") is None:
            f = group[0][0]
            if tuple(self.files[f].get_slice(name).get_shape()) != shape:
                raise KilnError(f"{f}: {name} has shape {tuple(self.files[f].get_slice(name).get_shape())}, "
                                f"expected {shape}")
            return _read_rows(self.files[f], name, dim, start, stop) if shape else self.files[f].get_tensor(name)
        row = math.prod(shape[1:]) if dim == 0 else math.prod(shape)  # (other dims: the whole slice, then cut)
        lo, hi = (start * row, stop * row) if dim == 0 else (0, math.prod(shape))
        flat, at = [], 0
        for f, spec in sorted(group, key=lambda fs: fs[1]["flat"][0]):
            a, b = spec["flat"]
            if a < at:
                continue  # the same range twice (a replica)
            if a != at:
                raise KilnError(f"{self.dir}: {name}: elements {at}..{a} are in no shard")
            if self.files[f].get_slice(name).get_shape() != [b - a]:
                raise KilnError(f"{f}: {name} holds {self.files[f].get_slice(name).get_shape()} elements, its "
                                f"range says {b - a}")
            if max(a, lo) < min(b, hi):
                flat.append(self.files[f].get_slice(name)[max(a, lo) - a:min(b, hi) - a])
            at = b
        if at != math.prod(shape):
            raise KilnError(f"{self.dir}: {name}: elements {at}..{math.prod(shape)} are in no shard")
        if dim == 0:
            return torch.cat(flat).view((stop - start, *shape[1:]))
        return torch.cat(flat).view(shape).narrow(dim, start, stop - start).contiguous()


def weights_file(directory: str | Path) -> str:
    """The file that names a MODEL dir's weights: model.safetensors, or the index of its shards (the index
    records each shard's sha256, so its digest identifies every weight)."""
    return INDEX if not (Path(directory) / WEIGHTS).exists() and (Path(directory) / INDEX).exists() else WEIGHTS


def open_model_weights(directory: str | Path) -> Weights:
    """A MODEL dir's plain weights (one file or index + shards), read lazily."""
    directory = Path(directory)
    if weights_file(directory) == INDEX:
        return IndexedWeights(directory)
    return FileWeights(directory / WEIGHTS)


def open_weights(directory: str | Path) -> Weights:
    """The plain weights of a checkpoint (sharded or old) or a MODEL dir, read lazily."""
    directory = Path(directory)
    if (directory / SHARDS_DIR).is_dir():
        return ShardedWeights(directory / SHARDS_DIR)
    if (directory / WEIGHTS).exists() or (directory / INDEX).exists():
        return open_model_weights(directory)
    raise KilnError(f"{directory}: no {SHARDS_DIR}/, {WEIGHTS} or {INDEX}; expected a checkpoint or MODEL directory")


def save_weights(weights: Weights, path: str | Path, metadata: dict[str, str] | None = None,
                 dtype: torch.dtype | None = torch.float32) -> str:
    """Write `weights` to one safetensors file tensor by tensor (as `dtype`, or as stored); return sha256."""
    names = weights.names()
    entries = [(n, dtype or weights.dtype(n), weights.shape(n)) for n in names]
    items = ((n, weights.get(n) if dtype is None else weights.get(n).to(dtype)) for n in names)
    return write_tensors(path, items, entries, metadata)
