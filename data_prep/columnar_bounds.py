"""Sizes that a Parquet page header or an Arrow IPC buffer declares, bounded before pyarrow allocates them.

The threat: a stranger's corpus file states, in a few bytes, how much memory its reader must allocate.
data_prep/readers.py checks a Parquet file's footer (each row group's sizes) against a budget, but
pyarrow trusts two more layers of claims that the footer does not bind:

- every page of a Parquet column chunk starts with its own Thrift PageHeader, whose
  `uncompressed_page_size` pyarrow allocates whole before it decompresses the page, even where it
  contradicts the footer: 20 bytes of header can ask for 2 GiB;
- every buffer of a compressed (LZ4/ZSTD) Arrow IPC record batch starts with an int64, its
  uncompressed length, which pyarrow allocates whole before it decompresses the buffer.

The bound: before pyarrow reads a row group, `parquet_pages_refusal` walks the headers of its column
chunks (a chunk starts at its dictionary page, if any, else its first data page, and spans
`total_compressed_size` bytes, as pyarrow reads it), reading each header with a bounded read and a
small hand-written Thrift compact-protocol reader (unknown fields skipped, nesting and lengths
bounded), never a page body; the row group is refused if its pages' uncompressed sizes add up past
its budget (`decompression_bomb`) or a page runs past its chunk (`corrupt_stream`). Before an Arrow
stream is decoded, `ipc_refusal` reads each message's flatbuffer metadata and, for a compressed
record or dictionary batch, the int64 in front of each of its buffers (the bodies are memory-mapped,
nothing is decompressed), and refuses the file if they add up past its budget.
"""

from __future__ import annotations

import struct

MAX_PAGE_HEADER = 16 << 20  # pyarrow's own limit on one page header
MAX_DEPTH = 16  # nested structs/lists skipped inside a page header (statistics nest two deep)
WINDOW = 16 << 10  # bytes first read for one page header
DATA_PAGES = (0, 3)  # PageType DATA_PAGE, DATA_PAGE_V2 (DICTIONARY_PAGE 2 and INDEX_PAGE 1 hold no row's values)
# PARQUET-816: parquet-mr before 1.2.9 left the dictionary page header out of a chunk's total_compressed_size, and
# pyarrow reads up to this many bytes past the chunk of a file whose `created_by` it parses as such a writer
# (Arrow's kMaxDictHeaderSize). The walk covers them for every file: a superset of what pyarrow reads, whatever
# a writer's name says.
MAX_DICT_HEADER = 100


class _Short(Exception):
    """The header runs past the bytes read so far."""


class _Compact:
    """The Thrift compact protocol, as far as reading one PageHeader needs (parquet.thrift)."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Short
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def varint(self) -> int:
        out = 0
        for shift in range(0, 70, 7):
            byte = self.take(1)[0]
            out |= (byte & 0x7F) << shift
            if byte < 0x80:
                return out
        raise ValueError("a varint longer than 10 bytes")

    def int(self) -> int:  # i16, i32 and i64: zigzag varints
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def fields(self):
        """(field id, type) of each field of a struct, up to its stop byte; the caller reads or skips the value."""
        fid = 0
        while byte := self.take(1)[0]:
            fid = fid + (byte >> 4) if byte >> 4 else self.int()
            yield fid, byte & 0x0F

    def skip(self, kind: int, depth: int, in_list: bool = False) -> None:
        if depth > MAX_DEPTH:
            raise ValueError("nested too deep")
        if kind in (1, 2):  # bool: in a field header's type, or one byte in a list
            self.take(1 if in_list else 0)
        elif kind in (3, 7):  # byte, double
            self.take(1 if kind == 3 else 8)
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 8:  # binary: varint length, bytes
            self.take(self.varint())
        elif kind in (9, 10):  # list, set: a byte of size (15: a varint follows) and element type
            head = self.take(1)[0]
            self.elements(head >> 4 if head >> 4 != 15 else self.varint(), (head & 0x0F,), depth)
        elif kind == 11:  # map: a varint size, then (if any) a byte of key and value types
            n = self.varint()
            self.elements(n, divmod(self.take(1)[0], 16) if n else (), depth)
        elif kind == 12:
            for _, t in self.fields():
                self.skip(t, depth + 1)
        else:
            raise ValueError(f"unknown Thrift type {kind}")

    def elements(self, n: int, types: tuple[int, ...], depth: int) -> None:
        if n > len(self.buf) - self.pos:  # every element takes a byte at least
            raise _Short
        for _ in range(n):
            for kind in types:
                self.skip(kind, depth + 1, in_list=True)


SUB_HEADER = {0: 5, 2: 7, 3: 8}  # page type -> the PageHeader field of its own header (data, dictionary, v2)


def _page_header(buf: bytes) -> tuple[int, int, int, int, int]:
    """(type, uncompressed_page_size, compressed_page_size, num_values, header length) of the PageHeader
    at the start of `buf`: fields 1-3, and field 1 (num_values) of the sub-header its type names (data 5,
    dictionary 7, v2 8), as pyarrow counts them: another sub-header's count is ignored. Every other field
    is skipped."""
    r, head, values = _Compact(buf), {}, {}
    for fid, kind in r.fields():
        if fid in (1, 2, 3) and kind == 5:
            head[fid] = r.int()
        elif fid in (5, 7, 8) and kind == 12:
            for sub, sub_kind in r.fields():
                if sub == 1 and sub_kind == 5:
                    values[fid] = r.int()
                else:
                    r.skip(sub_kind, 2)
        else:
            r.skip(kind, 1)
    if not {1, 2, 3} <= head.keys():
        raise ValueError("a page header without its type and sizes")
    return head[1], head[2], head[3], values.get(SUB_HEADER.get(head[1]), 0), r.pos


def _read_header(f, pos: int, end: int):
    window = WINDOW
    while True:
        f.seek(pos)
        buf = f.read(min(window, end - pos))
        try:
            return _page_header(buf)
        except _Short:
            if len(buf) >= end - pos or window >= MAX_PAGE_HEADER:
                raise ValueError(f"a page header runs past its column chunk or {MAX_PAGE_HEADER} bytes") from None
            window *= 4


def parquet_pages_refusal(path: str, group, size: int, budget: int) -> str | None:
    """Why row group `group` (pyarrow RowGroupMetaData) of the `size`-byte Parquet file at `path` must not be
    read, by its page headers, or None: all its pages' uncompressed sizes must add up to at most `budget`.
    Like pyarrow, a chunk's walk stops once its data pages hold all its values; it may run MAX_DICT_HEADER
    bytes past the chunk's declared end (PARQUET-816)."""
    total = 0
    with open(path, "rb") as f:
        for i in range(group.num_columns):
            col = group.column(i)
            start, dictionary = col.data_page_offset, col.dictionary_page_offset if col.has_dictionary_page else None
            if dictionary and 0 < dictionary < start:  # where pyarrow starts reading the chunk
                start = dictionary
            end, pos, seen, pages = start + col.total_compressed_size, start, 0, 0
            if start < 0 or not start < end <= size:
                return f"corrupt_stream: column chunk {col.path_in_schema} lies outside the file"
            end += min(MAX_DICT_HEADER, size - end)
            while pos < end and seen < col.num_values:
                pages += 1  # every data page holds a value; a dictionary and an index page, and an empty chunk's
                if pages > col.num_values + 3:  # (so a chunk of millions of empty 7-byte pages is not walked)
                    return (f"corrupt_stream: column chunk {col.path_in_schema} has more pages than its "
                            f"{col.num_values} values")
                try:
                    kind, raw, packed, values, length = _read_header(f, pos, end)
                except ValueError as err:
                    return f"corrupt_stream: column chunk {col.path_in_schema}, byte {pos}: {err}"
                if raw < 0 or packed < 0 or values < 0 or pos + length + packed > end:
                    return (f"corrupt_stream: a page of {packed} bytes at byte {pos} runs past its column chunk "
                            f"{col.path_in_schema} (ending at {end})")
                total += raw
                if total > budget:
                    return (f"decompression_bomb: page headers declare {total}+ bytes in a row group, over its "
                            f"budget of {budget} (column {col.path_in_schema}, byte {pos})")
                seen += values if kind in DATA_PAGES else 0
                pos += length + packed
    return None


# --------------------------------------------------------------------------- Arrow IPC (Message.fbs, Schema.fbs)


def _at(fmt: str, buf, pos: int):
    if pos < 0 or pos + struct.calcsize(fmt) > len(buf):
        raise ValueError(f"flatbuffer offset {pos} outside its {len(buf)} bytes")
    return struct.unpack_from(fmt, buf, pos)[0]


def _field(buf, table: int, i: int) -> int | None:
    """Where field `i` of the flatbuffer table at `table` is, or None where it is absent."""
    vtable = table - _at("<i", buf, table)
    if 4 + 2 * i + 2 > _at("<H", buf, vtable):
        return None
    off = _at("<H", buf, vtable + 4 + 2 * i)
    return table + off if off else None


def _ref(buf, pos: int) -> int:
    return pos + _at("<I", buf, pos)


def _decompressed(meta, body) -> int:
    """Bytes the buffers of the record or dictionary batch `meta` (its Message flatbuffer) decompress to;
    0 for other messages and for uncompressed batches (their buffers are read in place)."""
    message = _ref(meta, 0)
    kind, header = (_field(meta, message, i) for i in (1, 2))  # Message.header_type, Message.header
    kind = _at("<B", meta, kind) if kind is not None else 0
    if kind not in (2, 3) or header is None:  # MessageHeader DictionaryBatch 2, RecordBatch 3
        return 0
    batch = _ref(meta, header)
    if kind == 2:  # DictionaryBatch.data: its RecordBatch
        data = _field(meta, batch, 1)
        if data is None:
            return 0
        batch = _ref(meta, data)
    if _field(meta, batch, 3) is None:  # RecordBatch.compression absent: uncompressed
        return 0
    buffers = _field(meta, batch, 2)  # RecordBatch.buffers: [Buffer {offset: long, length: long}]
    vector = _ref(meta, buffers) if buffers is not None else None
    total = 0
    for k in range(_at("<I", meta, vector) if vector is not None else 0):
        offset, length = _at("<q", meta, vector + 4 + 16 * k), _at("<q", meta, vector + 12 + 16 * k)
        if length == 0:
            continue
        if offset < 0 or length < 8 or offset + length > len(body):
            raise ValueError(f"buffer {k} ({offset}, {length}) outside a body of {len(body)} bytes")
        declared = _at("<q", body, offset)  # -1: stored uncompressed, after the prefix
        if declared < -1:
            raise ValueError(f"buffer {k} declares {declared} bytes")
        total += length - 8 if declared == -1 else declared
    return total


def ipc_refusal(source, budget: int) -> str | None:
    """Why the Arrow IPC stream `source` (a pyarrow memory map, left at its start) must not be decoded, or None:
    its compressed batches' buffers must decompress to at most `budget` bytes in all."""
    import pyarrow as pa

    total = 0
    try:
        for message in pa.ipc.MessageReader.open_stream(source):
            body = memoryview(message.body) if message.body is not None else b""
            total += _decompressed(memoryview(message.metadata), body)
            if total > budget:
                return f"decompression_bomb: compressed record batches declare {total}+ bytes, budget {budget}"
    except (ValueError, pa.ArrowException) as err:
        return f"corrupt_stream: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    finally:
        source.seek(0)
    return None
