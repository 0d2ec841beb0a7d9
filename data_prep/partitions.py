"""Cut the inputs into partitions, the units of work of `kiln prep`'s per-document stages.

Partitions depend only on the files, `docs_per_part` (shard_docs) and `part_bytes`
(partition_bytes), never on the worker count, so `--workers 1` and `--workers 4` give the same
shards. Plain jsonl is cut at the first line boundary past `docs_per_part` lines or `part_bytes`
bytes; parquet at row-group boundaries by the same two limits, a row group over either limit
alone into equal row ranges; compressed files and Arrow files are one partition each (they
cannot be entered in the middle). `part_bytes` defaults to the inputs' total size / PARTS, at
least MIN_PART_BYTES: a corpus of fewer documents than shard_docs, or a parquet file of one row
group, still spreads over the workers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from data_prep.readers import BLOCK, file_kind, printable

PARTS = 64  # partitions a large input is cut into by default: work for 64 workers, few enough to stay cheap
MIN_PART_BYTES = 1 << 20  # below this a partition's fixed costs (a Ray task, its files) outweigh its work


def part_size(files: list[Path], part_bytes: int | None) -> int:
    """Bytes per partition: `part_bytes` if given, else the inputs' total size / PARTS, at least MIN_PART_BYTES."""
    if part_bytes:
        return part_bytes
    return max(MIN_PART_BYTES, -(-sum(os.path.getsize(p) for p in files) // PARTS))


def _jsonl_cuts(newlines: np.ndarray, offset: int, lines: int, cut: tuple[int, int], docs_per_part: int,
                part_bytes: int) -> list[tuple[int, int]]:
    """The partitions that start in one block: after the newline ending line first+docs_per_part-1 or the
    first newline at least part_bytes past the partition's start, whichever comes first. `newlines`: the
    block's newline positions; `offset`, `lines`: bytes and lines before it; `cut`: (start, first line)
    of the partition open when the block begins."""
    ends = offset + newlines  # absolute position of each newline; newline i ends line lines+i+1
    out = []
    start, first = cut
    while True:
        by_count = first + docs_per_part - 1 - lines - 1
        by_bytes = int(np.searchsorted(ends, start + part_bytes - 1))
        i = min(by_count if by_count < len(ends) else len(ends), by_bytes)
        if i >= len(ends):
            return out
        start, first = int(ends[i]) + 1, lines + i + 2
        out.append((start, first))


def _parquet_parts(meta, docs_per_part: int, part_bytes: int) -> list[dict]:
    """Row-group ranges of up to docs_per_part rows and part_bytes (compressed) bytes; a row group over
    either limit alone is cut into equal row ranges ("rows": [lo, hi) within the group)."""
    parts, start, rows, size, first = [], 0, 0, 0, 1
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        n = group.num_rows
        packed = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        pieces = min(n, max(-(-n // docs_per_part), -(-packed // part_bytes)))
        if pieces > 1:
            if g > start:  # the groups gathered so far
                parts.append(dict(start=start, end=g, first_line=first))
                first += rows
            bounds = [n * k // pieces for k in range(pieces + 1)]
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                parts.append(dict(start=g, end=g + 1, rows=[lo, hi], first_line=first + lo))
            start, first, rows, size = g + 1, first + n, 0, 0
            continue
        rows, size = rows + n, size + packed
        if rows >= docs_per_part or size >= part_bytes or g == meta.num_row_groups - 1:
            parts.append(dict(start=start, end=g + 1, first_line=first))
            start, first, rows, size = g + 1, first + rows, 0, 0
    return parts


def plan(files: list[Path], docs_per_part: int, part_bytes: int | None = None) -> tuple[list[dict], list[dict]]:
    """Hash every input and cut it into partitions; return (inputs, partitions).

    One streamed pass per file: sha256 plus (for plain jsonl) the byte offsets where partitions
    start, on line boundaries, with their first line number.
    """
    base = Path(os.path.commonpath([str(p.parent) for p in files]))
    part_bytes = part_size(files, part_bytes)
    inputs, parts = [], []
    for path in files:
        kind = file_kind(path)
        rel = printable(path.relative_to(base).as_posix())
        sha = hashlib.sha256()
        cuts = [(0, 1)]  # (byte offset, first line)
        with open(path, "rb") as f:
            offset, lines = 0, 0
            for block in iter(lambda: f.read(BLOCK), b""):
                sha.update(block)
                if kind == "jsonl":
                    newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
                    cuts += _jsonl_cuts(newlines, offset, lines, cuts[-1], docs_per_part, part_bytes)
                    lines += len(newlines)
                offset += len(block)
        size = offset
        inputs.append({"path": str(path), "rel": rel, "sha256": sha.hexdigest(), "bytes": size})
        if kind == "jsonl":
            cuts = [c for c in cuts if c[0] < size] or [(0, 1)]
            for i, (start, first) in enumerate(cuts):
                end = cuts[i + 1][0] if i + 1 < len(cuts) else size
                parts.append(dict(path=str(path), rel=rel, kind=kind, start=start, end=end, first_line=first))
        elif kind == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            parts += [dict(path=str(path), rel=rel, kind=kind, **p) for p in _parquet_parts(meta, docs_per_part, part_bytes)]
        else:
            parts.append(dict(path=str(path), rel=rel, kind=kind, start=0, end=size, first_line=1))
    for i, p in enumerate(parts):
        p["index"] = i
    return inputs, parts
