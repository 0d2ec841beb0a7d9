"""The Megatron .bin/.idx format, checked against bytes built by hand."""

import struct

import numpy as np
import pytest

from data_prep.indexed import IndexedDataset, IndexedWriter, dtype_for_vocab, shard_digest, shard_fingerprint


def hand_built(tmp_path, docs, dtype=np.uint16, code=8):
    """Build a shard byte by byte from the spec, independently of IndexedWriter."""
    sizes = [len(d) for d in docs]
    pointers, pos = [], 0
    for s in sizes:
        pointers.append(pos)
        pos += s * np.dtype(dtype).itemsize
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1)
    idx += struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1))
    (tmp_path / "hand.idx").write_bytes(idx)
    (tmp_path / "hand.bin").write_bytes(b"".join(np.asarray(d, dtype=dtype).tobytes() for d in docs))
    return tmp_path / "hand"


@pytest.mark.parametrize("dtype, code", [(np.uint16, 8), (np.int32, 4)])
def test_writer_matches_hand_built_bytes(tmp_path, dtype, code):
    docs = [[5, 6, 7, 2], [9, 2], [1000, 65000 if dtype == np.uint16 else 70000, 2]]
    ref = hand_built(tmp_path, docs, dtype, code)
    with IndexedWriter(tmp_path / "ours", dtype) as w:
        for d in docs:
            w.add(d)
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "hand.idx").read_bytes()
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "hand.bin").read_bytes()
    assert w.result == {"documents": 3, "tokens": 9, "sha256": shard_digest(tmp_path / "ours"),
                        **shard_fingerprint(tmp_path / "ours")}
    assert w.result["bin_bytes"] == 9 * np.dtype(dtype).itemsize
    ds = IndexedDataset(ref)
    assert len(ds) == 3 and ds.dtype == np.dtype(dtype) and ds.num_tokens == 9
    assert [list(ds[i]) for i in range(3)] == docs
    assert list(ds.get(0, 1, 2)) == [6, 7]
    assert list(ds.doc_idx) == [0, 1, 2, 3]


@pytest.mark.fault
def test_failed_write_leaves_nothing_under_final_name(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "s") as w:
            w.add([1, 2])
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_reader_rejects_corruption(tmp_path):
    with IndexedWriter(tmp_path / "s") as w:
        w.add([1, 2, 3])
    idx = tmp_path / "s.idx"
    idx.write_bytes(idx.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(tmp_path / "s")
    idx.write_bytes(b"NOTMAGIC!" + b"\0" * 40)
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDataset(tmp_path / "s")


def test_dtype_rule():
    assert dtype_for_vocab(32000) == np.uint16
    assert dtype_for_vocab(65500) == np.int32


# Megatron-Core's DType enum as its format description lists it (megatron/core/datasets/indexed_dataset.py),
# written out here independently of data_prep.indexed.
MEGATRON_DTYPE_TABLE = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32",
                        8: "uint16"}


def test_dtype_codes_match_megatron():
    from data_prep.indexed import CODE_OF, DTYPE_CODES

    assert {code: np.dtype(t).name for code, t in DTYPE_CODES.items()} == MEGATRON_DTYPE_TABLE
    assert {np.dtype(t).name: code for t, code in CODE_OF.items()} == {
        name: code for code, name in MEGATRON_DTYPE_TABLE.items() if "int" in name}


@pytest.mark.parametrize("code", sorted(MEGATRON_DTYPE_TABLE))
def test_reader_reads_every_megatron_code(tmp_path, code):
    """A shard written by hand with each code reads back with that dtype and those values."""
    dtype = np.dtype(MEGATRON_DTYPE_TABLE[code])
    docs = [[1, 2, 3], [4, 5]]
    ds = IndexedDataset(hand_built(tmp_path, docs, dtype, code))
    assert ds.dtype == dtype
    assert [ds[i].tolist() for i in range(2)] == docs
