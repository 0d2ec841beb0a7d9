"""Sizes declared below a Parquet file's footer and inside an Arrow stream: a page header's uncompressed size,
a compressed Arrow buffer's int64 length prefix. pyarrow allocates both whole, so an unfixed reader asked for
gigabytes from a 5 KB file; data_prep/columnar_bounds.py bounds them before pyarrow reads. Through the real
reader in a process with a 3 GiB address-space limit, and `kiln prep`. docs/security.md lists them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import columnar_bounds, partitions, readers
from data_prep.document import BadRecord

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.security
CLAIM = 2_000_000_000  # what a malicious header declares: 2 GB, from a file of a few KB

READ = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an unfixed reader fails the malloc, not the box
from data_prep import partitions, readers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, parts = partitions.plan([readers.Path(p) for p in sys.argv[1:]], 1000)
seen = [r.raw if hasattr(r, "reason") else r.id for p in parts for r in readers.read_partition(p)]
print(json.dumps({"seen": seen, "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


def read_bounded(*paths: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", READ, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _i32(v: int) -> bytes:
    """A Thrift compact i32 field, one id after the previous field's: its header byte, a zigzag varint."""
    return b"\x15" + _varint((v << 1) ^ (v >> 63))


def table(rows: int, prefix: str):
    import pyarrow as pa

    return pa.table({"id": [f"{prefix}{i}" for i in range(rows)],
                     "text": [f"{prefix} says something fine, number {i} " * 3 for i in range(rows)]})


def parquet_page_bomb(path: Path, declared: int = CLAIM, overrun: int = 0) -> Path:
    """Two row groups of 200 rows ("g0"...), zstd, one page per column chunk. The second group's text page header
    is rewritten in place, at its length (the footer untouched, consistent): its uncompressed size is `declared`,
    its compressed size runs `overrun` bytes past the chunk; an unknown field pads it (readers skip those)."""
    import pyarrow.parquet as pq

    pq.write_table(table(400, "g"), path, row_group_size=200, compression="zstd", use_dictionary=False)
    col = pq.read_metadata(path).row_group(1).column(1)
    data = bytearray(path.read_bytes())
    at = col.data_page_offset
    assert data[at:at + 3] == b"\x15\x00\x15"  # type DATA_PAGE, then uncompressed_page_size
    pos = at + 3
    while data[pos] & 0x80:
        pos += 1
    assert data[pos + 1] == 0x15  # compressed_page_size
    packed, shift, pos = 0, 0, pos + 2
    while True:
        packed |= (data[pos] & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if data[pos - 1] < 0x80:
            break
    packed >>= 1
    length = col.total_compressed_size - packed  # one page: the header is what the body leaves of the chunk
    header = (_i32(0) + _i32(declared) + _i32(packed + overrun)
              + b"\x2c" + _i32(200) + _i32(0) + _i32(3) + _i32(3) + b"\x00")  # data_page_header: 200 values, PLAIN
    rest = length - len(header)  # for field 15 (binary: its header byte, varint length, bytes), the stop byte
    pad = next(n for n in range(rest - 3, rest - 6, -1) if 2 + len(_varint(n)) + n == rest)
    header += b"\xa8" + _varint(pad) + b"p" * pad + b"\x00"
    assert len(header) == length
    data[at:at + length] = header
    path.write_bytes(data)
    return path


def arrow_stream(path: Path, tbl, compression: str | None = None, batch_rows: int = 300) -> Path:
    import pyarrow as pa

    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, tbl.schema, options=options) as writer:
        writer.write_table(tbl, max_chunksize=batch_rows)
    return path


def arrow_buffer_bomb(path: Path, declared: int = CLAIM) -> Path:
    """A zstd Arrow stream of one batch: 1000 texts of 1000 bytes, whose data buffer (1,000,000 bytes, the int64
    in front of its 1 KB of zstd) is patched to declare `declared` bytes."""
    import pyarrow as pa

    texts = [("ab" * 500)[:-4] + f"{i:04d}" for i in range(1000)]
    arrow_stream(path, pa.table({"id": [f"z{i}" for i in range(1000)], "text": texts}), "zstd", 1000)
    data = path.read_bytes()
    prefix = struct.pack("<q", 1_000_000)
    assert data.count(prefix) == 1 and len(data) < 20_000
    path.write_bytes(data.replace(prefix, struct.pack("<q", declared)))
    return path


def rows_of(tbl) -> list[tuple[str, str]]:
    return list(zip(tbl["id"].to_pylist(), tbl["text"].to_pylist(), strict=True))


def records(path: Path):
    _, parts = partitions.plan([path], 250)
    return [r for p in parts for r in readers.read_partition(p)]


def test_a_parquet_page_header_declaring_gigabytes_is_refused_before_pyarrow_allocates(tmp_path):
    """The footer is honest (a few KB per row group); one page header says 2 GB (an unfixed reader: pyarrow's
    `malloc of size 2000000000 failed`), another a compressed size past its chunk. Each is its row group's one
    quarantined record; the first group, and the files around, are read."""
    import pyarrow.parquet as pq

    pq.write_table(table(3, "a"), tmp_path / "a_good.parquet")
    pq.write_table(table(3, "d"), tmp_path / "d_good.parquet")
    bomb = parquet_page_bomb(tmp_path / "b_pages.parquet")
    overrun = parquet_page_bomb(tmp_path / "c_overrun.parquet", declared=30_000, overrun=1 << 20)
    assert bomb.stat().st_size < 20_000
    out = read_bounded(tmp_path / "a_good.parquet", bomb, overrun, tmp_path / "d_good.parquet")
    seen = out["seen"]
    assert seen[:3] == ["a0", "a1", "a2"] and seen[-3:] == ["d0", "d1", "d2"], seen
    assert seen[3:203] == [f"g{i}" for i in range(200)] == seen[204:404]
    assert seen[203].startswith("decompression_bomb: page headers declare 2000") and "column text" in seen[203]
    assert seen[404].startswith("corrupt_stream: a page of ") and "runs past its column chunk text" in seen[404]
    assert len(seen) == 408 and out["peak_mb"] < 150, out


def test_an_arrow_buffer_declaring_gigabytes_is_refused_before_pyarrow_decompresses(tmp_path):
    """A 5 KB zstd Arrow stream whose data buffer's length prefix says 2 GB (an unfixed reader: pyarrow's
    `malloc of size 2000000000 failed`): the file is one quarantined record, read no further; the files
    around it, compressed or not, are read."""
    plain = arrow_stream(tmp_path / "a_plain.arrow", table(3, "a"))
    packed = arrow_stream(tmp_path / "c_zstd.arrow", table(3, "c"), "zstd")
    out = read_bounded(plain, arrow_buffer_bomb(tmp_path / "b_bomb.arrow"), packed)
    assert out["seen"][:3] == ["a0", "a1", "a2"] and out["seen"][4:] == ["c0", "c1", "c2"], out
    assert out["seen"][3].startswith("decompression_bomb: compressed record batches declare 2000"), out
    assert out["peak_mb"] < 150, out


def test_an_arrow_buffer_outside_its_body_or_a_garbled_page_header_is_corrupt_not_a_crash(tmp_path):
    """Declared lengths below -1, and page headers that are not Thrift, are refused in one line."""
    bad = arrow_buffer_bomb(tmp_path / "neg.arrow", declared=-5)
    [rec] = records(bad)
    assert isinstance(rec, BadRecord) and rec.reason == "corrupt_stream" and "declares -5 bytes" in rec.raw
    import pyarrow.parquet as pq

    path = parquet_page_bomb(tmp_path / "garbled.parquet", declared=30_000)
    col = pq.read_metadata(path).row_group(1).column(0)
    data = bytearray(path.read_bytes())
    data[col.data_page_offset:col.data_page_offset + 8] = b"\xff" * 8  # a field of Thrift type 15: no such type
    path.write_bytes(data)
    got = records(path)
    assert [r.id for r in got[:200]] == [f"g{i}" for i in range(200)] and len(got) == 201
    assert got[200].reason == "corrupt_stream" and "column chunk id, byte" in got[200].raw, got[200]


def test_the_compact_reader_skips_what_it_does_not_need_within_limits():
    """Unknown fields of every Thrift type are skipped; nesting past MAX_DEPTH, and a header that runs past the
    bytes it may read, are errors, not recursion or reads without end."""
    header = (_i32(2) + _i32(10) + _i32(10) + b"\x16\x04" + b"\x1b\x02\x58\x02\x01x\x04\x01y" + b"\x19\x35\x02\x04\x06"
              + b"\x1c\x15\x0e\x00" + b"\x00")  # type 2, sizes, i64 4:2, map 5, list 6, dictionary header 7
    assert columnar_bounds._page_header(header) == (2, 10, 10, 7, len(header))
    deep = _i32(0) + _i32(1) + _i32(1) + b"\x1c" * 40 + b"\x00" * 41
    with pytest.raises(ValueError, match="nested too deep"):
        columnar_bounds._page_header(deep)
    with pytest.raises(columnar_bounds._Short):
        columnar_bounds._page_header(_i32(0) + _i32(1) + b"\x18\xff\xff\xff\x7f")  # a 256 MiB binary field


@pytest.mark.parametrize("options", [dict(compression="none"), dict(compression="snappy", use_dictionary=False),
                                     dict(compression="zstd", data_page_version="2.0", write_page_checksum=True),
                                     dict(compression="gzip", write_page_index=True, data_page_size=2048)])
def test_ordinary_parquet_is_read_as_before_and_its_pages_walked_as_written(tmp_path, options):
    """Several row groups of several pages each: every page header is found where pyarrow wrote it (sizes and
    value counts add up to the footer's), and the rows come out as pyarrow reads them."""
    import pyarrow.parquet as pq

    path = tmp_path / "ok.parquet"
    tbl = table(1500, "ok")
    pq.write_table(tbl, path, row_group_size=500, **{"data_page_size": 4096, "write_batch_size": 64, **options})
    meta = pq.read_metadata(path)
    with open(path, "rb") as f:
        for g in range(meta.num_row_groups):
            assert columnar_bounds.parquet_pages_refusal(str(path), meta.row_group(g), path.stat().st_size, 1 << 20) \
                is None
            for i in range(meta.row_group(g).num_columns):
                col = meta.row_group(g).column(i)
                pos = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
                end, raw, values, pages = pos + col.total_compressed_size, 0, 0, 0
                while pos < end:
                    kind, page_raw, packed, n, length = columnar_bounds._read_header(f, pos, end)
                    raw, pos, pages = raw + length + page_raw, pos + length + packed, pages + 1
                    values += n if kind in columnar_bounds.DATA_PAGES else 0
                assert (pos, raw, values) == (end, col.total_uncompressed_size, col.num_values)
                assert pages > 1 or col.path_in_schema == "id"
    got = records(path)
    assert [(d.id, d.text) for d in got] == rows_of(tbl)


@pytest.mark.parametrize("compression", [None, "zstd", "lz4"])
def test_ordinary_arrow_streams_are_read_as_before(tmp_path, compression):
    tbl = table(1000, "ok")
    got = records(arrow_stream(tmp_path / "ok.arrow", tbl, compression))
    assert [(d.id, d.text) for d in got] == rows_of(tbl)


@pytest.mark.slow
def test_kiln_prep_quarantines_page_and_buffer_bombs_and_keeps_the_rest(tmp_path):
    """Both bombs beside a good jsonl: one quarantined record each, the rest prepared (200 Parquet rows too)."""
    from test_security import prep_cmd, prep_env, raw_corpus

    raw = raw_corpus(tmp_path / "raw")
    parquet_page_bomb(raw / "b_pages.parquet")
    (raw / "c_hf").mkdir()  # a `datasets` save_to_disk dir: how `kiln prep DIR` finds Arrow files
    (raw / "c_hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    arrow_buffer_bomb(raw / "c_hf" / "data-00000-of-00001.arrow")
    out = tmp_path / "out"
    res = subprocess.run(prep_cmd(raw, out), cwd=ROOT, env=prep_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    quarantine = [json.loads(x) for x in (out / "report" / "quarantine.jsonl").read_text().splitlines()]
    bombs = sorted((q["source"], q["reason"]) for q in quarantine if q["reason"] == "decompression_bomb")
    assert bombs == [("b_pages.parquet:201", "decompression_bomb"),
                     ("c_hf/data-00000-of-00001.arrow:1", "decompression_bomb")]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["quarantined"]["decompression_bomb"] == 2, counts


def test_a_chunk_of_many_empty_pages_is_refused_without_walking_them(tmp_path):
    """7-byte page headers declaring nothing (no values, no bytes), 100,000 of them in a chunk that holds one
    value: refused once the pages outnumber the values, not walked header by header."""
    from types import SimpleNamespace

    from data_prep.columnar_bounds import parquet_pages_refusal

    page = b"\x15\x00\x15\x00\x15\x00\x00"  # type DATA_PAGE, uncompressed 0, compressed 0 (Thrift compact)
    path = tmp_path / "pages.parquet"
    path.write_bytes(b"PAR1" + page * 100_000)
    col = SimpleNamespace(data_page_offset=4, has_dictionary_page=False, dictionary_page_offset=None,
                          total_compressed_size=len(page) * 100_000, num_values=1, path_in_schema="text")
    group = SimpleNamespace(num_columns=1, column=lambda i: col)
    reason = parquet_pages_refusal(str(path), group, path.stat().st_size, 1 << 30)
    assert reason and reason.startswith("corrupt_stream") and "more pages than its 1 values" in reason


def test_an_old_parquet_mr_chunk_missing_its_dictionary_header_is_read_as_pyarrow_reads_it(tmp_path):
    """PARQUET-816: parquet-mr before 1.2.9 left the dictionary page header out of a chunk's
    total_compressed_size, and pyarrow reads up to 100 bytes past such a chunk. The walk covers those bytes for
    every file (a superset of what pyarrow reads, whatever the writer's name), and stops at the chunk's last
    value as pyarrow does, so the next chunk's pages inside them are not taken for this one's."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from data_prep.columnar_bounds import parquet_pages_refusal

    path = tmp_path / "old.parquet"
    pq.write_table(table(400, "old"), path, row_group_size=400, use_dictionary=True, data_page_size=1024)
    meta, size = pq.read_metadata(path), path.stat().st_size
    with open(path, "rb") as f:  # each dictionary chunk as parquet-mr 1.2.8 described it: minus the header
        real = meta.row_group(0)
        cols = []
        for i in range(real.num_columns):
            col = real.column(i)
            header = columnar_bounds._read_header(f, col.dictionary_page_offset, size)[4] if col.has_dictionary_page else 0
            cols.append(SimpleNamespace(**{k: getattr(col, k) for k in ("data_page_offset", "has_dictionary_page",
                                           "dictionary_page_offset", "num_values", "path_in_schema")},
                                        total_compressed_size=col.total_compressed_size - header))
    assert any(c.has_dictionary_page for c in cols)
    old = SimpleNamespace(num_columns=len(cols), column=lambda i: cols[i])
    assert parquet_pages_refusal(str(path), old, size, 1 << 20) is None
    assert parquet_pages_refusal(str(path), real, size, 1 << 20) is None  # the slack takes no next chunk
    assert [(d.id, d.text) for d in records(path)] == rows_of(table(400, "old"))


def test_a_page_counts_only_the_values_of_its_own_kind_of_header():
    """A data page carrying a dictionary sub-header that claims every value of the chunk would end the walk
    early, before a later page declaring gigabytes; pyarrow counts a data page's own sub-header only, and so
    does the walk."""
    sub = b"\x15" + _varint(1000) + b"\x00"  # num_values 500 (zigzag 1000), then the struct's end
    lie = b"\x15" + _varint(8000) + b"\x00"  # num_values 4000
    header = _i32(0) + _i32(10) + _i32(10) + b"\x2c" + sub + b"\x2c" + lie + b"\x00"  # fields 5 and 7
    assert columnar_bounds._page_header(header) == (0, 10, 10, 500, len(header))
    v2 = _i32(3) + _i32(10) + _i32(10) + b"\x2c" + lie + b"\x3c" + sub + b"\x00"  # fields 5 (ignored) and 8
    assert columnar_bounds._page_header(v2)[3] == 500


@pytest.mark.fault
@pytest.mark.parametrize("dictionary", [False, True])
def test_a_page_pyarrow_cannot_decode_quarantines_the_rest_of_its_row_group_not_the_job(tmp_path, dictionary):
    """A zstd page body garbled in the middle row group of three: the other groups' rows come out, the rest of
    that group is one corrupt_stream record per partition naming where it starts, and nothing raises (it stopped `kiln
    prep` with pyarrow's OSError). A dictionary-encoded column fails already while its decoded size is counted."""
    import pyarrow.parquet as pq

    path = tmp_path / "garbled.parquet"
    tbl = table(3000, "g")
    pq.write_table(tbl, path, row_group_size=1000, compression="zstd", use_dictionary=dictionary)
    col = pq.read_metadata(path).row_group(1).column(1)
    with open(path, "rb") as f:
        header = columnar_bounds._read_header(f, col.data_page_offset, path.stat().st_size)[4]
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + header:col.data_page_offset + header + 8] = b"\xff" * 8  # no zstd frame
    path.write_bytes(bytes(data))
    got = records(path)
    docs, bad = [r for r in got if not isinstance(r, BadRecord)], [r for r in got if isinstance(r, BadRecord)]
    assert [(d.id, d.text) for d in docs] == rows_of(tbl)[:1000] + rows_of(tbl)[2000:]
    # (records() reads partitions of 250 rows: each of the group's four says where its rows start, 1-based)
    assert [(b.source, b.reason) for b in bad] == [(f"garbled.parquet:{1001 + 250 * i}", "corrupt_stream")
                                                   for i in range(4)], bad
