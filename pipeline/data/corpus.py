"""A prepared corpus (the output DIR of `kiln prep`) seen as one token stream per split.

Training, evaluation, calibration and distillation all read data the same way:
the shards of a split, in manifest order, concatenated into one stream (EOS
already ends every document), cut into fixed-length windows that cross
document boundaries, as Megatron and nanoGPT do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

from data_prep.confine import escapes, read_confined
from data_prep.indexed import IndexedDataset, shard_digest, shard_fingerprint
from pipeline.config import KilnError
from pipeline.console import log

MANIFEST_MAX = 64 << 20  # bytes of manifest.json (a corpus of 100,000 shards needs ~30 MB)
TOKENIZER_MAX = 64 << 20  # bytes of a sentencepiece model (a 256k vocabulary is ~5 MB)
MAX_OPEN_SHARDS = 64  # shards a TokenStream keeps mapped at once (one memory map each); data.max_open_shards


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

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Refuse shards that are missing, truncated, stale or swapped: sizes, .idx header and the sampled
        fingerprint recorded at prep time (O(shards), not O(bytes); `verify_full` reads everything), and a
        tokenizer outside the directory or other than the manifest's. `rank`/`world`: check only every
        `world`-th shard from `rank` (training splits the check over its ranks; TrainData.verify gathers
        the verdicts), so no rank opens more than its share of a corpus of many thousand shards."""
        self.tokenizer_path  # noqa: B018 - confined and hashed once, before any work
        unfingerprinted = 0
        for shard in self.manifest["shards"][rank::world]:
            prefix = self._prefix(shard)
            self._open(shard, prefix)
            if "fingerprint" not in shard:
                unfingerprinted += 1
                continue
            try:
                found = shard_fingerprint(prefix, root=self.dir)
            except FileNotFoundError:
                raise KilnError(f"{prefix}.bin/.idx: listed in {self.dir / 'manifest.json'} but missing") from None
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

    def stream(self, split: str, max_open: int = MAX_OPEN_SHARDS) -> TokenStream:
        """The split's shards as one TokenStream. Their lengths come from the manifest's token counts (which
        `verify` checks against each .bin's size), so nothing is opened here: a shard is opened when a read
        first touches it, and at most `max_open` stay open (TokenStream)."""
        shards = [s for s in self.shards(split) if self._tokens(s)]
        if not self.shards(split):
            raise KilnError(f"{self.dir / 'manifest.json'}: no '{split}' shards")

        def open_shard(k: int) -> np.ndarray:  # no reference to the stream: its cache frees the maps with it
            return self._open(shards[k], self._prefix(shards[k])).tokens

        return TokenStream([self._tokens(s) for s in shards], open_shard, self.vocab_size, f"{self.dir} ({split})",
                           max_open)

    def _tokens(self, shard: dict) -> int:
        """The shard's token count as the manifest records it (every Kiln manifest does)."""
        n = shard.get("tokens")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise KilnError(f"{self.dir / 'manifest.json'}: shard {shard.get('path')!r} has no valid token count "
                            f"(tokens: {n!r}); prepare the corpus again")
        return n

    def dataset(self, shard: dict) -> IndexedDataset:
        """One shard of the manifest, both files confined to this directory (data_prep/indexed.py::open_part)."""
        return self._open(shard, self._prefix(shard))

    def _open(self, shard: dict, prefix: Path) -> IndexedDataset:
        """Open one shard, its .bin size checked against the manifest's token count: one line if it cannot be."""
        try:
            return IndexedDataset(prefix, tokens=shard.get("tokens"), root=self.dir)
        except FileNotFoundError:
            raise KilnError(f"{prefix}.bin/.idx: listed in {self.dir / 'manifest.json'} but missing") from None
        except ValueError as err:
            raise KilnError(f"{err}; it does not match {self.dir / 'manifest.json'}") from None


class TokenStream:
    """Several shards read as one contiguous array of tokens, without copying them into memory. Every read
    is checked against the vocabulary (`vocab_size`, the manifest's, which training and eval check against
    the model's): a token id outside it would index past the embedding.

    `lengths[k]` is shard k's token count and `open_part(k)` its tokens (a memory map). Shards open on demand
    and an LRU cache keeps at most `max_open` of them: evicting one drops the last reference to its map,
    which unmaps it. A corpus of 1.4T tokens is ~56k shards; one map (and one file descriptor) per shard for
    the whole run would approach Linux's vm.max_map_count (65,530) and pass the usual 1,024-descriptor limit.
    """

    def __init__(self, lengths: list[int], open_part: Callable[[int], np.ndarray], vocab_size: int | None = None,
                 where: str = "corpus", max_open: int = MAX_OPEN_SHARDS):
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.cumsum([0] + self.lengths)
        self.part = functools.lru_cache(maxsize=max_open)(open_part)
        self.vocab_size, self.where = vocab_size, where

    @property
    def open_shards(self) -> int:
        return self.part.cache_info().currsize

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
            take = min(length - filled, self.lengths[part] - local)
            out[filled : filled + take] = self.part(part)[local : local + take]
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
