"""Megatron `MMapIndexedDataset` shards (.bin + .idx), written and read byte-exactly.

GPT-NeoX and Megatron-LM read these files unchanged, so the layout is fixed:

    .idx = b"MMIDIDX\\x00\\x00"  magic (9 bytes)
           <Q  version (1)
           <B  dtype code, Megatron's DType enum (8 = uint16, 4 = int32, 7 = float32, ...)
           <Q  sequence count n
           <Q  document count (len of doc_idx = n + 1 here)
           int32[n]  sequence lengths (tokens)
           int64[n]  byte offsets of each sequence in .bin
           int64[n+1] document index: sequence numbers where documents start, from 0
    .bin = the token ids, back to back, in the dtype above

Kiln writes one sequence per document. Files appear under their final names only
when complete (write to `*.tmp`, fsync, rename .bin then .idx), so a reader never
sees a half-written shard.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from pathlib import Path

import numpy as np

from data_prep.confine import open_confined
from data_prep.errors import KilnError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-Core's `DType` enum (megatron/core/datasets/indexed_dataset.py): the code is the enum value.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
# Token shards hold integers only; the float codes are readable but never written.
CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items() if np.issubdtype(t, np.integer)}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with room to spare (Megatron's < 65500 rule), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class IndexedWriter:
    """Stream documents into `<prefix>.bin/.idx`; `close()` publishes both atomically.

    Use as a context manager; on an exception the temp files are removed and
    nothing appears under the final names.
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"unsupported shard dtype {self.dtype}")
        self.bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        # pid-suffixed: a task Ray retried while the first attempt still runs (a lost node on a shared
        # filesystem) must not write into the same file
        self._bin_tmp = self.bin_path.with_name(f"{self.bin_path.name}.tmp{os.getpid()}")
        self._idx_tmp = self.idx_path.with_name(f"{self.idx_path.name}.tmp{os.getpid()}")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self._bin_hash = hashlib.sha256()
        self.sizes: list[int] = []
        self.tokens = 0

    def _failed(self, err: OSError) -> KilnError:
        """Disk full, quota, I/O error: drop the temp files and say which shard could not be written."""
        self.abort()
        return KilnError(f"{self.prefix}.bin/.idx: cannot write shard: {err.strerror or err}")

    def _write(self, data: bytes) -> None:
        try:
            self._bin.write(data)
        except OSError as err:
            raise self._failed(err) from None

    def add(self, tokens) -> None:
        """Append one document (already ending with EOS)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        data = arr.tobytes(order="C")
        self._write(data)
        self._bin_hash.update(data)
        self.sizes.append(int(arr.size))
        self.tokens += int(arr.size)

    def add_many(self, docs: list) -> None:
        """Append several documents (each already ending with EOS) in one write; same bytes as `add` each."""
        sizes = [len(d) for d in docs]
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=sum(sizes))
        data = flat.tobytes()
        self._write(data)
        self._bin_hash.update(data)
        self.sizes.extend(sizes)
        self.tokens += int(flat.size)

    def close(self) -> dict:
        """Write the index, publish both files; return {"documents", "tokens", "sha256"}."""
        try:
            return self._close()
        except OSError as err:
            if not self.idx_path.exists():  # the .bin may have been renamed already; without .idx it is no shard
                self.bin_path.unlink(missing_ok=True)
            raise self._failed(err) from None

    def _close(self) -> dict:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[self.dtype])
        header += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
        idx_bytes = header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes()
        with open(self._idx_tmp, "wb") as f:
            f.write(idx_bytes)
        _fsync_rename(self._bin_tmp, self.bin_path)
        _fsync_rename(self._idx_tmp, self.idx_path)  # the .idx appearing marks the shard complete
        digest = hashlib.sha256(self._bin_hash.digest() + hashlib.sha256(idx_bytes).digest()).hexdigest()
        return {"documents": len(sizes), "tokens": self.tokens, "sha256": digest, **shard_fingerprint(self.prefix)}

    def abort(self) -> None:
        try:
            self._bin.close()
        except OSError:  # flushing the last buffer failed (disk full): the file goes anyway
            pass
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.result = self.close()
        else:
            self.abort()


def open_part(prefix: Path, suffix: str, root: Path | None):
    """A shard's .bin or .idx for reading. `root`: the corpus directory whose manifest named the shard (both
    files are then confined to it: open_confined); None for a shard Kiln itself just wrote."""
    path = prefix.with_name(prefix.name + suffix)
    if root is None:
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    return open_confined(root, str(path.relative_to(root)), f"{root / 'manifest.json'}: shard")


FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK = 4096


def shard_fingerprint(prefix: str | Path, root: Path | None = None) -> dict:
    """What start-up checks instead of hashing every byte: both files' sizes and a sha256 over the .idx
    header and FINGERPRINT_BLOCKS blocks of each file at evenly spaced offsets (first and last included).
    A truncated, stale or swapped shard changes it; reading it costs ~130 KB whatever the shard's size.
    The full `shard_digest` stays the identity of a shard (manifest digest, `kiln verify`)."""
    prefix = Path(prefix)
    h = hashlib.sha256(b"kiln-shard-fingerprint-v1")
    sizes = {}
    for suffix in (".bin", ".idx"):
        with open_part(prefix, suffix, root) as f:
            size = os.fstat(f.fileno()).st_size
            sizes[suffix[1:] + "_bytes"] = size
            h.update(struct.pack("<Q", size))
            last = max(0, size - FINGERPRINT_BLOCK)
            offsets = sorted({last * k // (FINGERPRINT_BLOCKS - 1) for k in range(FINGERPRINT_BLOCKS)})
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(FINGERPRINT_BLOCK))
    return {"fingerprint": h.hexdigest(), **sizes}


def shard_digest(prefix: str | Path, root: Path | None = None) -> str:
    """The digest `IndexedWriter.close()` reports, recomputed from the files on disk (streamed)."""
    prefix = Path(prefix)
    hashes = []
    for suffix in (".bin", ".idx"):
        h = hashlib.sha256()
        with open_part(prefix, suffix, root) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        hashes.append(h.digest())
    return hashlib.sha256(hashes[0] + hashes[1]).hexdigest()


class IndexedDataset:
    """Memory-mapped reader: `ds[i]` is sequence i as a numpy view, nothing copied."""

    def __init__(self, prefix: str | Path, tokens: int | None = None, root: Path | None = None):
        """`tokens`: the shard's token count when known (a manifest), so opening reads only the header
        instead of summing every sequence length. `root`: the corpus directory that named it (open_part)."""
        self.prefix = Path(prefix)
        idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        bin_path = self.prefix.with_name(self.prefix.name + ".bin")
        with open_part(self.prefix, ".idx", root) as f:
            head = f.read(len(MAGIC) + 8 + 1 + 8 + 8)
            idx_size = os.fstat(f.fileno()).st_size
            idx = np.memmap(f, mode="r", dtype=np.uint8) if idx_size else np.zeros(0, np.uint8)
        if len(head) < 34 or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (bad magic)")
        (version,) = struct.unpack_from("<Q", head, 9)
        if version != VERSION:
            raise ValueError(f"{idx_path}: index version {version}, expected {VERSION}")
        (code,) = struct.unpack_from("<B", head, 17)
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        (n,) = struct.unpack_from("<Q", head, 18)
        (n_docs,) = struct.unpack_from("<Q", head, 26)
        expected = 34 + 4 * n + 8 * n + 8 * n_docs
        if idx_size != expected:
            raise ValueError(f"{idx_path}: truncated or corrupt ({idx_size} bytes, expected {expected})")
        self.sizes = np.frombuffer(idx, dtype=np.int32, count=n, offset=34)
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n, offset=34 + 4 * n)
        self.doc_idx = np.frombuffer(idx, dtype=np.int64, count=n_docs, offset=34 + 12 * n)
        total = int(tokens) if tokens is not None else int(self.sizes.astype(np.int64).sum())
        with open_part(self.prefix, ".bin", root) as f:
            bin_size = os.fstat(f.fileno()).st_size
            if bin_size != total * self.dtype.itemsize:
                raise ValueError(f"{bin_path}: size {bin_size} does not match its index ({total} tokens)")
            self.tokens = np.memmap(f, mode="r", dtype=self.dtype) if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        seq = self[i]
        return seq[offset : None if length is None else offset + length]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)
