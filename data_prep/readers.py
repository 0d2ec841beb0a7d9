"""Find input files, cut them into partitions, and stream records out of them.

Inputs are jsonl (plain, .gz, .zst), parquet, and local Hugging Face `datasets`
directories (`save_to_disk`: Arrow IPC stream files). Reading is streaming with
bounded memory: compressed text is decompressed block by block, parquet row group
by row group, Arrow record batch by batch. Every record becomes either a
`Document` or a `BadRecord` with a reason — nothing is dropped silently.

A partition (data_prep/partitions.py) is a byte range of a plain jsonl file, a row-group
range or one group's row range of a parquet file, or a whole compressed or Arrow file.

Inputs are written by strangers, so reading is bounded: a line longer than
MAX_RECORD_BYTES is quarantined as `record_too_large` without being held in memory,
a compressed file stops at max(MAX_EXPANSION x its size, EXPANSION_FLOOR) decompressed
bytes (`decompression_bomb`), and the decompressor is fed FEED bytes at a time, so no
single call can produce more than FEED x the format's maximum ratio (~32 MiB for zstd).
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator
from functools import partial
from itertools import repeat, starmap
from pathlib import Path

import numpy as np
import zstandard

from data_prep.columnar_bounds import ipc_refusal, parquet_pages_refusal
from data_prep.confine import escapes, read_confined
from data_prep.document import BadRecord, Document
from data_prep.errors import ConfigError, KilnError, first_line

BLOCK = 1 << 20
BATCH_ROWS = 8192  # Parquet/Arrow rows per record batch
BATCH_BYTES = 64 << 20  # a batch decoding to more is turned into records row by row
MAX_RECORD_BYTES = 128 << 20  # one jsonl line; a 100 MB document still fits
MAX_EXPANSION = 100  # decompressed / compressed; real text compresses 3-10x
EXPANSION_FLOOR = 256 << 20  # small files may expand more, up to this many bytes
FEED = 1 << 10  # compressed bytes per decompress call: zstd's ratio is at most ~32768 (RLE blocks)
HEAD = 200  # bytes of a refused record kept for the quarantine report
_JSONL = (".jsonl", ".ndjson")
_COMPRESSED = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}


def file_kind(path: Path) -> str | None:
    name = path.name.lower()
    for ext, kind in _COMPRESSED.items():
        if name.endswith(ext) and name[: -len(ext)].endswith(_JSONL):
            return kind
    if name.endswith(_JSONL):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return None


def _small(directory: Path, name: str) -> bytes:
    """A dataset directory's own JSON (someone else's): confined, a regular file, at most 16 MiB."""
    try:
        return read_confined(directory, name, f"{directory}:", 16 << 20)
    except KilnError as err:
        raise ConfigError(str(err)) from None


def _hf_arrow_files(directory: Path) -> list[Path] | None:
    """Arrow files of a `save_to_disk` directory (Dataset or DatasetDict), else None."""
    if (directory / "state.json").is_file():
        state = json.loads(_small(directory, "state.json"))
        names = [f.get("filename") for f in state.get("_data_files", [])]
        for name in names:  # a dataset directory someone else wrote names files inside itself only
            if why := escapes(directory, name):
                raise ConfigError(f"{directory / 'state.json'}: _data_files filename {name!r} {why}")
        return [directory / name for name in names]
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads(_small(directory, "dataset_dict.json")).get("splits", [])
        return [p for s in splits for p in (_hf_arrow_files(directory / s) or [])]
    return None


def _walk(directory: Path) -> list[Path]:
    """Input files under a directory, in sorted order; a `save_to_disk` directory contributes its Arrow files."""
    hf = _hf_arrow_files(directory)
    if hf is not None:
        return hf
    found = []
    for p in sorted(directory.iterdir()):
        if p.is_dir():
            found.extend(_walk(p))
        elif p.is_file() and file_kind(p) and p.suffix != ".arrow":
            found.append(p)
    return found


def resolve_inputs(inputs: list[str], exclude: str | Path | None = None) -> list[Path]:
    """Expand files, globs and directories into a sorted, de-duplicated file list.

    Files under `exclude` (the output directory) are skipped, so `kiln prep data --out
    data/prepped` never reads its own reports and work files back in.
    """
    found: list[Path] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(item, recursive=True))]
            matches = [p for p in matches if p.is_file() and file_kind(p)]
        elif Path(item).is_dir():
            matches = _walk(Path(item))
        elif Path(item).is_file():
            if not file_kind(Path(item)):
                raise ConfigError(f"{item}: unsupported input type (jsonl[.gz|.zst], parquet, arrow, or a directory)")
            matches = [Path(item)]
        else:
            raise ConfigError(f"{item}: no such file or directory")
        if not matches:
            raise ConfigError(f"{item}: no input files found (jsonl[.gz|.zst], parquet, Hugging Face dataset dir)")
        found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if exclude is not None:
        skip = Path(exclude).resolve()
        unique = [p for p in unique if skip not in p.parents]
        if not unique:
            raise ConfigError(f"{' '.join(inputs)}: no input files outside the output directory {exclude}")
    return unique


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: undecodable bytes (kept by Python as surrogates) become `\\xNN`.

    The name goes into record sources, fallback ids and reports, which are written as UTF-8.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- streaming lines


def _raw_blocks(path: str, start: int, end: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(BLOCK, left))
            if not block:
                return
            left -= len(block)
            yield block


def _decompressed_blocks(path: str, kind: str, state: dict) -> Iterator[bytes]:
    """Decompress frame after frame (multi-member gzip, multi-frame zstd); note truncation, corruption
    and a file that expands past its budget (a decompression bomb)."""
    new = (lambda: zlib.decompressobj(31)) if kind == "gz" else (lambda: zstandard.ZstdDecompressor().decompressobj())
    size = os.path.getsize(path)
    budget = max(MAX_EXPANSION * size, EXPANSION_FLOOR)
    d, fed, produced = new(), False, 0
    for block in _raw_blocks(path, 0, size):
        view = memoryview(block)
        for i in range(0, len(view), FEED):
            piece = view[i:i + FEED]
            while piece:
                fed = True
                try:
                    out = d.decompress(piece)
                except (zlib.error, zstandard.ZstdError) as err:
                    state["error"] = f"corrupt_stream: {err}"
                    return
                produced += len(out)
                if produced > budget:
                    state["error"] = f"decompression_bomb: more than {budget} bytes from {size}"
                    return
                if out:
                    yield out
                if d.eof:
                    piece, d, fed = d.unused_data, new(), False
                else:
                    piece = b""
    if fed and not d.eof:
        state["error"] = "truncated_stream"


def _head(pieces: list[bytes]) -> bytes:
    out = b""
    for p in pieces:
        out += p[:HEAD - len(out)]
        if len(out) >= HEAD:
            break
    return out


def iter_lines(part: dict) -> Iterator[tuple[int, bytes, str | None]]:
    """Yield (line number, raw line, problem); problem is None for complete lines. A line over
    MAX_RECORD_BYTES is yielded as its first HEAD bytes with problem `record_too_large`."""
    state: dict = {}
    if part["kind"] == "jsonl":
        blocks = _raw_blocks(part["path"], part["start"], part["end"])
    else:
        blocks = _decompressed_blocks(part["path"], part["kind"], state)
    # A huge line arrives in many blocks: its pieces wait in `pending` and are joined once (re-joining a
    # growing tail per block is quadratic), and no finished line is still referenced while the next is read.
    # Past MAX_RECORD_BYTES only its head is kept and the rest is skipped up to the next newline.
    lineno, pending, size, oversize = part["first_line"], [], 0, False
    for block in blocks:
        *done, last = block.split(b"\n")
        if done:
            if oversize or size + len(done[0]) > MAX_RECORD_BYTES:
                yield lineno, _head([*pending, done[0]]), "record_too_large"
                lineno += 1
                del done[0]
            else:
                done[0] = b"".join([*pending, done[0]])
            pending, size, oversize = [], 0, False
            yield from zip(range(lineno, lineno + len(done)), done, repeat(None))
            lineno += len(done)
            del done
        if oversize:
            continue
        size += len(last)
        pending.append(last)
        if size > MAX_RECORD_BYTES:
            pending, oversize = [_head(pending)], True
    if state.get("error"):  # what was cut off is reported by its head
        yield lineno, _head(pending), state["error"]
    elif oversize:
        yield lineno, pending[0], "record_too_large"
    elif tail := b"".join(pending):
        yield lineno, tail, None


# --------------------------------------------------------------------------- records


def _check_text(text, source: str, raw) -> BadRecord | None:
    if text is None:
        return BadRecord(source, "null_text", raw())
    if not isinstance(text, str):
        return BadRecord(source, "non_string_text", raw())
    if not text.strip():
        return BadRecord(source, "empty_text", raw())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return BadRecord(source, "lone_surrogate", raw())
    return None


def _make_id(value, fallback: str) -> str:
    if value is None or value == "":
        return fallback
    value = value if isinstance(value, str) else json.dumps(value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return fallback
    return value


def json_object(line: bytes, source: str) -> tuple[dict, str] | BadRecord | None:
    """One jsonl line -> (the object, its text), BadRecord, or None for a blank line (not a record)."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadRecord(source, "undecodable", line.decode("utf-8", "replace"))
    if not s.strip():
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return BadRecord(source, "malformed_json", s)
    except RecursionError:  # e.g. 100k nested lists: json's C parser gives up on the stack depth
        return BadRecord(source, "nested_too_deep", s)
    if not isinstance(obj, dict):
        return BadRecord(source, "not_an_object", s)
    return obj, s


def parse_line(line: bytes, source: str, text_field: str, id_field: str) -> Document | BadRecord | None:
    """One jsonl line -> Document, BadRecord, or None for a blank line (not a record)."""
    parsed = json_object(line, source)
    if not isinstance(parsed, tuple):
        return parsed
    obj, s = parsed
    if text_field not in obj:
        return BadRecord(source, "missing_text_field", s)
    text = obj[text_field]
    bad = _check_text(text, source, lambda: s)
    if bad:
        return bad
    return Document(_make_id(obj.get(id_field), source), text, source)


def _arrow_groups(part: dict, fields: tuple[str, ...]):
    """(budget, rows, batches) per Parquet row group, or once for an Arrow file: the decoded bytes its rows may
    come to, its row count, its record batches. A row group whose metadata already declares more is refused
    unread: (reason, rows, None), as is one whose page headers declare more, or an Arrow file whose compressed
    buffers do (data_prep/columnar_bounds.py). Flat columns among `fields` are read as dictionaries where
    Parquet stores them so (`read_dictionary`): a batch then holds each distinct value once, not once per row.
    A partition may be a row range [lo, hi) of one large group (`part["rows"]`, data_prep/partitions.py)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if part["kind"] != "parquet":
        with pa.memory_map(part["path"]) as source:
            budget = max(MAX_EXPANSION * source.size(), EXPANSION_FLOOR)
            if refused := ipc_refusal(source, budget):  # compressed buffers' declared sizes, none decompressed
                yield refused, 0, None
            else:
                yield budget, None, pa.ipc.open_stream(source)
        return
    meta = pq.read_metadata(part["path"])
    schema = meta.schema.to_arrow_schema()
    cols = [c for c in fields if c in schema.names]
    strings = [c for c in cols if not pa.types.is_nested(schema.field(c).type)]  # (SFT's messages are nested)
    pf = pq.ParquetFile(part["path"], metadata=meta, read_dictionary=strings)
    packed_file = sum(_packed(pf.metadata.row_group(g)) for g in range(pf.metadata.num_row_groups))
    size = os.path.getsize(part["path"])
    lo, hi = part.get("rows") or (0, None)  # a row range of one large group, or whole groups
    for g in range(part["start"], part["end"]):
        group = pf.metadata.row_group(g)
        rows = (hi if hi is not None else group.num_rows) - lo
        budget = _row_group_budget(group, packed_file, size)
        declared = max(group.total_byte_size, sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)))
        if declared > budget:  # by its own metadata: refused before pyarrow allocates it
            yield f"decompression_bomb: a row group of {declared} bytes from {_packed(group)}", rows, None
        elif refused := parquet_pages_refusal(part["path"], group, size, budget):  # by its pages' headers
            yield refused, rows, None
        elif (decoded := _dictionary_decoded(pf, g, strings, budget)) > budget:
            yield f"decompression_bomb: a row group decoding to {decoded}+ bytes from {_packed(group)}", rows, None
        else:
            batches = pf.iter_batches(row_groups=[g], columns=cols or None, batch_size=BATCH_ROWS)
            yield budget, rows, _row_range(batches, lo, hi)


def _row_range(batches, lo: int, hi: int | None):
    """Rows [lo, hi) of a row group's batches (hi None: to its end)."""
    at = 0
    for batch in batches:
        begin, end = max(lo - at, 0), batch.num_rows if hi is None else min(hi - at, batch.num_rows)
        at += batch.num_rows
        if end > begin:
            yield batch.slice(begin, end - begin)
        if hi is not None and at >= hi:
            return


def _dictionary_decoded(pf, g: int, cols: list[str], budget: int) -> int:
    """What row group `g`'s dictionary-encoded columns among `cols` decode to, counted from their indices
    (stopping past `budget`): a dictionary page holds each value once, so a few KB of metadata can stand
    for one large value repeated on every row. Columns stored plain are bounded by their metadata. What
    pyarrow cannot decode is counted up to there (reading the group's rows then meets the same error)."""
    group = pf.metadata.row_group(g)
    paths = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    encoded = [c for c in cols if c in paths and paths[c].has_dictionary_page]
    total = 0
    for batch in _until_error(pf.iter_batches(row_groups=[g], columns=encoded, batch_size=BATCH_ROWS), []) \
            if encoded else ():
        total += int(_decoded_sizes(batch, tuple(encoded)).sum())
        if total > budget:
            break
    return total


def _packed(group) -> int:
    return sum(group.column(i).total_compressed_size for i in range(group.num_columns))


def _row_group_budget(group, packed_file: int, size: int) -> int:
    """What a row group may decode to: MAX_EXPANSION x its compressed size (as the metadata says, but no more
    than the file's `size`), or its share of the file's EXPANSION_FLOOR (so that a file of many row groups
    gets the floor once, as a compressed jsonl does)."""
    packed = _packed(group)
    return max(MAX_EXPANSION * min(packed, size), EXPANSION_FLOOR * packed // max(packed_file, 1))


def _decoded_sizes(batch, fields: tuple[str, ...]) -> np.ndarray:
    """Bytes each row of `batch` decodes to in `fields`, counted without decoding (a dictionary column's
    value lengths are taken by its indices), plus 1 per row (as a newline counts in jsonl)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes = np.ones(batch.num_rows, dtype=np.int64)
    for name in (f for f in fields if f in batch.schema.names):
        col = batch.column(batch.schema.names.index(name))
        values = col.dictionary if pa.types.is_dictionary(col.type) else col
        if pa.types.is_string(values.type) or pa.types.is_binary(values.type) or \
                pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type):
            lengths = pc.binary_length(values)
            if values is not col:
                lengths = lengths.take(col.indices)
            sizes += lengths.fill_null(0).to_numpy(zero_copy_only=False)
        else:  # numbers, lists: their buffers, spread over the rows
            sizes += col.nbytes // max(batch.num_rows, 1)
    return sizes


def _line_record(rel: str, text_field: str, id_field: str, lineno: int, line: bytes,
                 problem: str | None) -> Document | BadRecord | None:
    source = f"{rel}:{lineno}"
    if problem:
        return BadRecord(source, problem.split(":")[0], line.decode("utf-8", "replace"))
    return parse_line(line, source, text_field, id_field)


def read_partition(part: dict, text_field: str = "text", id_field: str = "id") -> Iterator[Document | BadRecord]:
    """Stream a partition's records as Documents and BadRecords, in file order."""
    rel = part["rel"]
    if part["kind"] in ("jsonl", "gz", "zst"):
        # starmap/filter, unlike a for loop, keep no reference to the last (maybe 100 MB) line and record
        records = starmap(partial(_line_record, rel, text_field, id_field), iter_lines(part))
        yield from filter(lambda rec: rec is not None, records)
        return
    for item in _budgeted_batches(part, (text_field, id_field)):
        if isinstance(item, BadRecord):
            yield item
        else:
            yield from _arrow_records(rel, item[1], item[0], text_field, id_field, item[2])


def _budgeted_batches(part: dict, fields: tuple[str, ...]):
    """(first row, batch, decoded bytes per row) of a Parquet/Arrow partition's batches, within their row
    group's budget, or a BadRecord where a group (by its metadata) or the rest of a group (past its budget)
    is refused undecoded; in file order."""
    rel, row = part["rel"], part["first_line"]
    for budget, rows, batches in _arrow_groups(part, fields):
        if batches is None:  # refused by its metadata
            yield BadRecord(f"{rel}:{row}", budget.split(":")[0], budget)
            row += rows
            continue
        start, spent, failed = row, 0, []
        for batch in _until_error(batches, failed):
            sizes = _decoded_sizes(batch, fields)
            if spent + int(sizes.sum()) > budget:  # the rest of the group is not decoded
                over = int(np.argmax(spent + np.cumsum(sizes) > budget))
                if over:
                    yield row, batch.slice(0, over), sizes[:over]
                row += over
                yield BadRecord(f"{rel}:{row}", "decompression_bomb",
                                f"decompression_bomb: rows from here on decode to more than {budget} bytes")
                row = start + rows if rows is not None else row + 1
                break
            spent += int(sizes.sum())
            yield row, batch, sizes
            row += batch.num_rows
        if failed:  # a page (or IPC body) pyarrow cannot decode: the rest of the group, one record
            yield BadRecord(f"{rel}:{row}", "corrupt_stream", f"corrupt_stream: rows from here on: {first_line(failed[0])}")
            row = start + rows if rows is not None else row + 1


def _until_error(batches, failed: list):
    """`batches` up to the first error pyarrow raises decoding them, which goes into `failed`."""
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError) as err:  # (pyarrow's decompression errors are OSErrors)
        failed.append(err)


def _arrow_records(rel: str, batch, row: int, text_field: str, id_field: str, sizes: np.ndarray):
    """Documents and BadRecords of one record batch whose decoded size is within budget. The batch is
    decoded at once when it comes to at most BATCH_BYTES, else row by row; a row over MAX_RECORD_BYTES is
    refused without being decoded."""
    names = batch.schema.names
    if text_field not in names:
        for i in range(batch.num_rows):
            yield BadRecord(f"{rel}:{row + i}", "missing_text_field", _arrow_raw(batch, i))
        return
    texts, ids = (batch.column(names.index(f)) if f in names else _nulls(batch.num_rows) for f in (text_field, id_field))
    whole = int(sizes.sum()) <= BATCH_BYTES
    if whole:
        texts, ids = texts.to_pylist(), ids.to_pylist()
    for i in range(batch.num_rows):
        source = f"{rel}:{row + i}"
        if sizes[i] > MAX_RECORD_BYTES:
            yield BadRecord(source, "record_too_large", f"{int(sizes[i])} bytes")
            continue
        text, rid = (texts[i], ids[i]) if whole else (texts[i].as_py(), ids[i].as_py())
        bad = _check_text(text, source, lambda i=i: _arrow_raw(batch, i))
        yield bad or Document(_make_id(rid, source), text, source)


def _nulls(n: int):
    import pyarrow as pa

    return pa.nulls(n)


def _arrow_raw(batch, i: int) -> str:
    return json.dumps({k: batch.column(k)[i].as_py() for k in batch.schema.names}, default=str)


def read_records(part: dict, fields: tuple[str, ...]) -> Iterator[tuple[str, dict] | BadRecord]:
    """Stream a partition's records as (source, object) or BadRecord, in file order, bounded as above: for
    readers of structured records (SFT conversations) that check the fields themselves. Parquet and Arrow
    rows give the named `fields` they have."""
    rel = part["rel"]
    if part["kind"] in ("jsonl", "gz", "zst"):
        for lineno, line, problem in iter_lines(part):
            source = f"{rel}:{lineno}"
            if problem:
                yield BadRecord(source, problem.split(":")[0], line.decode("utf-8", "replace"))
            elif (parsed := json_object(line, source)) is not None:
                yield (source, parsed[0]) if isinstance(parsed, tuple) else parsed
        return
    for item in _budgeted_batches(part, fields):
        if isinstance(item, BadRecord):
            yield item
            continue
        row, batch, sizes = item
        names = [name for name in fields if name in batch.schema.names]
        for i in range(batch.num_rows):
            if sizes[i] > MAX_RECORD_BYTES:
                yield BadRecord(f"{rel}:{row + i}", "record_too_large", f"{int(sizes[i])} bytes")
            else:
                yield f"{rel}:{row + i}", {name: batch.column(name)[i].as_py() for name in names}
