"""A prepared corpus (the output DIR of `kiln prep`) seen as one token stream per split.

Training, evaluation, calibration and distillation all read data the same way:
the shards of a split, in manifest order, concatenated into one stream (EOS
already ends every document), cut into fixed-length windows that cross
document boundaries, as Megatron and nanoGPT do.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from data_prep.confine import escapes, read_confined
from data_prep.indexed import IndexedDataset, shard_digest, shard_fingerprint
from pipeline.config import KilnError
from pipeline.console import log

MANIFEST_MAX = 64 << 20  # bytes of manifest.json (a corpus of 100,000 shards needs ~30 MB)
TOKENIZER_MAX = 64 << 20  # bytes of a sentencepiece model (a 256k vocabulary is ~5 MB)


def check_prep_dir(directory: str | Path) -> Path:
    """A raw corpus file given where a `kiln prep` output belongs (--data, data.paths, --calib) is refused in one
    line naming the command that prepares it: the commands call this before their heavy imports."""
    path = Path(directory)
    if path.is_file():
        raise KilnError(f"{path}: a file, not a `kiln prep` output directory; prepare it first "
                        f"(kiln prep {path} --out DIR) and pass DIR")
    return path


class PreparedCorpus:
    """manifest.json + shards of one prep output directory."""

    def __init__(self, directory: str | Path, verify: bool = True):
        """`verify`: check every shard against the manifest by size, header and fingerprint (fast: a few
        reads per shard, whatever its size). `verify_full` hashes every byte."""
        self.dir = check_prep_dir(directory)
        path = self.dir / "manifest.json"
        try:
            self.manifest = json.loads(read_confined(self.dir, "manifest.json", str(self.dir), MANIFEST_MAX))
        except FileNotFoundError:
            raise KilnError(f"{path}: not found; is {self.dir} a `kiln prep` output directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KilnError(f"{path}: not valid JSON ({type(err).__name__} at byte {getattr(err, 'pos', '?')})") from None
        if verify:
            self.verify()

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @cached_property
    def tokenizer_path(self) -> Path:
        """The manifest's tokenizer.path, confined to this directory; a file there must have the
        manifest's tokenizer.sha256 (recomputed): a manifest cannot pull another file into a model."""
        tok = self.manifest["tokenizer"]
        path = self._inside(tok.get("path"), "tokenizer.path")
        try:
            data = read_confined(self.dir, tok["path"], f"{self.dir / 'manifest.json'}: tokenizer.path", TOKENIZER_MAX)
        except FileNotFoundError:
            data = None
        if data is not None:
            digest = hashlib.sha256(data).hexdigest()
            if digest != tok.get("sha256"):
                raise KilnError(f"{path}: sha256 {digest[:12]}… does not match {self.dir / 'manifest.json'}'s "
                                "tokenizer.sha256; refusing this tokenizer")
        return path

    def _inside(self, name, key: str) -> Path:
        if why := escapes(self.dir, name):
            raise KilnError(f"{self.dir / 'manifest.json'}: {key} {name!r} {why}; refusing this corpus")
        return self.dir / name

    def shards(self, split: str) -> list[dict]:
        return [s for s in self.manifest["shards"] if s["split"] == split]

    def verify(self) -> None:
        """Refuse shards that are missing, truncated, stale or swapped: sizes, .idx header and the sampled
        fingerprint recorded at prep time (O(shards), not O(bytes); `verify_full` reads everything), and a
        tokenizer outside the directory or other than the manifest's."""
        self.tokenizer_path  # noqa: B018 - confined and hashed once, before any work
        unfingerprinted = 0
        for shard in self.manifest["shards"]:
            prefix = self._prefix(shard)
            try:
                IndexedDataset(prefix, tokens=shard.get("tokens"), root=self.dir)
                if "fingerprint" not in shard:
                    unfingerprinted += 1
                    continue
                found = shard_fingerprint(prefix, root=self.dir)
            except FileNotFoundError:
                raise KilnError(f"{prefix}.bin/.idx: listed in {self.dir / 'manifest.json'} but missing") from None
            except ValueError as err:
                raise KilnError(f"{err}; it does not match {self.dir / 'manifest.json'}") from None
            for key, files in (("bin_bytes", ".bin"), ("idx_bytes", ".idx"), ("fingerprint", ".bin/.idx")):
                if key in shard and found[key] != shard[key]:
                    raise KilnError(f"{prefix}{files}: {key} {str(found[key])[:12]} does not match the manifest's "
                                    f"(changed since prep); `kiln verify {self.dir}` checks every byte")
        if unfingerprinted:
            log.warning("%s: %d shards have no fingerprint (prepared by an older Kiln): checked by size and header "
                        "only; `kiln verify %s` checks every byte", self.dir, unfingerprinted, self.dir)

    def verify_full(self, rank: int = 0, world: int = 1, threads: int = 4) -> int:
        """sha256 of every byte of this rank's share of the shards (every `world`-th, from `rank`), several at a
        time; raise KilnError naming the first that differs from the manifest. Returns the bytes read."""
        from concurrent.futures import ThreadPoolExecutor

        mine = self.manifest["shards"][rank::world]

        def check(shard: dict) -> int:
            prefix = self._prefix(shard)
            try:
                actual = shard_digest(prefix, root=self.dir)
            except FileNotFoundError:
                raise KilnError(f"{prefix}.bin/.idx: listed in {self.dir / 'manifest.json'} but missing") from None
            if actual != shard["sha256"]:
                raise KilnError(f"{prefix}.bin: digest {actual[:12]}… does not match manifest {shard['sha256'][:12]}…")
            return sum(os.lstat(prefix.with_name(prefix.name + x)).st_size for x in (".bin", ".idx"))

        with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL on large blocks
            return sum(pool.map(check, mine))

    def _prefix(self, shard: dict) -> Path:
        path = self._inside(shard["path"], "shards[].path")
        return path.with_suffix("") if path.suffix in (".bin", ".idx") else path

    def stream(self, split: str) -> TokenStream:
        shards = self.shards(split)
        if not shards:
            raise KilnError(f"{self.dir / 'manifest.json'}: no '{split}' shards")
        return TokenStream([self.dataset(s) for s in shards], self.vocab_size, f"{self.dir} ({split})")

    def dataset(self, shard: dict) -> IndexedDataset:
        """One shard of the manifest, both files confined to this directory (data_prep/indexed.py::open_part)."""
        return IndexedDataset(self._prefix(shard), tokens=shard.get("tokens"), root=self.dir)


class TokenStream:
    """Several shards read as one contiguous array of tokens, without copying them into memory. Every read
    is checked against the vocabulary (`vocab_size`, the manifest's, which training and eval check against
    the model's): a token id outside it would index past the embedding."""

    def __init__(self, datasets: list[IndexedDataset], vocab_size: int | None = None, where: str = "corpus"):
        self.parts = [d.tokens for d in datasets if d.num_tokens]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.vocab_size, self.where = vocab_size, where

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] as int64, crossing shard boundaries when needed."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"read [{start}, {start + length}) outside stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        part = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = pos - int(self.offsets[part])
            take = min(length - filled, len(self.parts[part]) - local)
            out[filled : filled + take] = self.parts[part][local : local + take]
            filled, pos, part = filled + take, pos + take, part + 1
        if self.vocab_size is not None and length and (out.min() < 0 or out.max() >= self.vocab_size):
            raise KilnError(f"{self.where}: tokens [{start}, {start + length}) hold an id outside the vocabulary "
                            f"of {self.vocab_size}; the shards do not match the manifest's tokenizer")
        return out


class Windows:
    """Non-overlapping windows of `block_size + 1` tokens (inputs and shifted targets)."""

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream, self.block_size = stream, block_size
        self.count = (len(stream) - 1) // block_size
        if self.count < 1:
            raise KilnError(f"corpus has {len(stream)} tokens, fewer than one window of {block_size + 1}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        return self.stream.read(i * self.block_size, self.block_size + 1)

    @cached_property
    def tokens(self) -> int:
        return self.count * self.block_size
