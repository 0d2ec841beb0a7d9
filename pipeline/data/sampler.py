"""Which training sample comes next: a blended, shuffled, deterministic sample index.

Sample i of the run is a pure function of (seed, i): no state to save but the
number of samples consumed, and resuming at sample n reads nothing before it.

* Each corpus is cut into fixed windows of block_size+1 tokens across document
  boundaries (`Windows`); every epoch over a corpus is a fresh seeded permutation,
  evaluated one sample at a time (`Permutation`): nothing of size O(corpus) is ever
  built, so a multi-terabyte corpus starts as fast as a small one.
* Blending: samples come in chunks of CHUNK; inside a chunk corpus k gets
  round(weight_k * CHUNK) slots, spread by Megatron's greedy rule and then
  shuffled by the seed. The same slot pattern repeats every chunk, so the
  position of sample i inside corpus k is known in O(1).
* Step s uses samples [s*G, (s+1)*G) of the global batch G; data-parallel rank r
  takes its contiguous slice, so the order never depends on the layout.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pipeline.config import ConfigError, DataConfig, KilnError
from pipeline.data.corpus import PreparedCorpus, Windows
from pipeline.parallel.topology import raise_first

CHUNK = 4096
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a fast 64-bit mixing function (the Feistel round function)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


class Permutation:
    """A seeded pseudorandom permutation of range(n), evaluated point by point in O(1) memory.

    A 4-round Feistel network is a bijection on [0, 2^bits) (bits even, 2^bits >= n); values that land
    outside [0, n) are fed through again ("cycle walking") until they land inside, which keeps it a
    bijection of [0, n). Fewer than 8 rounds trips on average, whatever n."""

    ROUNDS = 4

    def __init__(self, n: int, key: list[int]):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.default_rng(key).integers(0, 2**63, size=self.ROUNDS)]

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside a permutation of {self.n}")
        x = self._feistel(i)
        while x >= self.n:
            x = self._feistel(x)
        return x


def blend_slots(weights: list[float], seed: int, chunk: int = CHUNK) -> np.ndarray:
    """Corpus id for each slot of a chunk: greedy (largest deficit first), then shuffled."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    slots = np.empty(chunk, dtype=np.int64)
    counts = np.zeros(len(w))
    for i in range(chunk):
        k = int(np.argmax(w * (i + 1) - counts))
        slots[i] = k
        counts[k] += 1
    return np.random.default_rng([seed, 7]).permutation(slots)


class BlendedSamples:
    """Sample i (int) -> int64 array of block_size+1 tokens, from several corpora."""

    def __init__(self, windows: list[Windows], weights: list[float], seed: int):
        self.windows, self.seed = windows, seed
        self.slots = blend_slots(weights, seed)
        self._orders: dict[tuple[int, int], Permutation] = {}
        self.per_chunk = np.bincount(self.slots, minlength=len(windows))
        if any(self.per_chunk[k] == 0 and weights[k] > 0 for k in range(len(windows))):
            raise ConfigError(f"data.weights: a weight below 1/{CHUNK} of the total gets no samples")
        # rank of each slot among the slots of the same corpus
        self.rank_in_chunk = np.zeros(CHUNK, dtype=np.int64)
        seen = np.zeros(len(windows), dtype=np.int64)
        for i, k in enumerate(self.slots):
            self.rank_in_chunk[i] = seen[k]
            seen[k] += 1

    def _order(self, corpus: int, epoch: int) -> Permutation:
        """The window order of one epoch over one corpus (a few kept: each is a handful of integers)."""
        key = (corpus, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4 * len(self.windows):
                self._orders.pop(next(iter(self._orders)))
            self._orders[key] = Permutation(len(self.windows[corpus]), [self.seed, corpus, epoch])
        return self._orders[key]

    def locate(self, i: int) -> tuple[int, int]:
        """(corpus, window) of global sample i."""
        chunk, slot = divmod(int(i), CHUNK)
        k = int(self.slots[slot])
        pos = chunk * int(self.per_chunk[k]) + int(self.rank_in_chunk[slot])
        epoch, j = divmod(pos, len(self.windows[k]))
        return k, self._order(k, epoch)(j)

    def __getitem__(self, i: int) -> np.ndarray:
        k, w = self.locate(i)
        return self.windows[k][w]

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, start+count) as (inputs, targets) of shape (count, block_size)."""
        rows = np.stack([self[i] for i in range(start, start + count)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def open_corpora(cfg: DataConfig, verify: bool = True) -> list[PreparedCorpus]:
    """The corpora of `data.paths`; one line if any is missing or they come from different tokenizers."""
    if not cfg.paths:
        raise ConfigError("data.paths: no prepared corpus given (a `kiln prep` output directory)")
    corpora = [PreparedCorpus(p, verify=verify) for p in cfg.paths]
    vocabs = {c.vocab_size for c in corpora}
    if len(vocabs) > 1:
        detail = ", ".join(f"{c.dir}: {c.vocab_size}" for c in corpora)
        raise ConfigError(f"data.paths: corpora have different tokenizer vocab sizes ({detail})")
    shas = {c.manifest["tokenizer"].get("sha256") for c in corpora} - {None}
    if len(shas) > 1:
        detail = ", ".join(f"{c.dir}: {(c.manifest['tokenizer'].get('sha256') or '?')[:12]}" for c in corpora)
        raise ConfigError(f"data.paths: corpora were tokenized with different tokenizers ({detail}); "
                          "prep them with the same --tokenizer")
    return corpora


class TrainData:
    """The corpora of `data.paths`, opened once per process and verified once across the ranks."""

    def __init__(self, cfg: DataConfig, block_size: int, seed: int, verify: bool = True, rank: int = 0,
                 world: int = 1):
        """`verify`: check the shards against their manifests, split over `world` ranks (a collective when
        world > 1: every rank must construct its TrainData). Nothing else here opens a shard: streams open
        them on demand, at most data.max_open_shards at a time per corpus split."""
        self.corpora = open_corpora(cfg, verify=False)
        if verify:
            self.verify(rank, world)
        self.vocab_size = self.corpora[0].vocab_size
        self.block_size = block_size
        self.max_open = cfg.max_open_shards
        weights = cfg.weights or [1.0] * len(self.corpora)
        self.train = BlendedSamples([Windows(c.stream("train", self.max_open), block_size) for c in self.corpora],
                                    weights, seed)
        self.val = self._val_windows(cfg.val_tokens)

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Size, header and fingerprint of every shard (PreparedCorpus.verify), rank r checking shards r::world
        of each corpus; every rank raises the first problem any rank found."""
        problem = None
        try:
            for c in self.corpora:
                c.verify(rank, world)
        except KilnError as err:
            problem = str(err)
        except OSError as err:  # unreadable (permissions, I/O): still one line on every rank, not a hang
            problem = f"{err.filename or 'a shard'}: cannot read ({err.strerror or err}); refusing this corpus"
        raise_first(problem, world)

    def _val_windows(self, val_tokens: int) -> list[tuple[Windows, int]]:
        """The first val_tokens worth of windows of every corpus' val split, in order (no shuffle).
        Sets val_requested (windows asked for) and val_available (windows the val splits hold)."""
        out: list[tuple[Windows, int]] = []
        per = max(1, val_tokens // self.block_size // len(self.corpora)) if val_tokens else 0
        self.val_requested, self.val_available = per * len(self.corpora), 0
        for c in self.corpora:
            if not per or not c.shards("val"):
                continue
            try:
                w = Windows(c.stream("val", self.max_open), self.block_size)
            except KilnError:
                continue  # a val split shorter than one window: nothing to evaluate on
            self.val_available += len(w)
            out.extend((w, j) for j in range(min(per, len(w))))
        return out

    def verify_full(self, rank: int = 0, world: int = 1) -> None:
        """Every byte of every shard against the manifest, the shards split over `world` ranks (collective
        when world > 1: every rank raises the first problem any rank found)."""
        problem = None
        try:
            for c in self.corpora:
                c.verify_full(rank, world)
        except KilnError as err:
            problem = str(err)
        raise_first(problem, world)

    @property
    def digests(self) -> list[str]:
        return [c.digest for c in self.corpora]

    @property
    def tokenizer(self):
        path = self.corpora[0].tokenizer_path
        return path if path.exists() else None

    def val_bytes(self, windows: int) -> int | None:
        """UTF-8 bytes of the targets of the first `windows` validation windows: what training's val_bpb divides
        by. A corpus' windows are its first ones in order, so their targets are one run of tokens, decoded as
        `kiln eval` decodes what it scores (pipeline/evaluate.py::count_bytes). None without a tokenizer file."""
        from pipeline.evaluate import count_bytes

        tok = self.tokenizer
        if tok is None:
            return None
        total = 0
        for w, run in itertools.groupby(self.val[:windows], key=lambda pair: pair[0]):
            total += count_bytes(w.stream.read(1, len(list(run)) * self.block_size), tok)
        return total

    def val_batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([w[j] for w, j in self.val[start : start + count]])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def rank_slice(step_start: int, global_batch: int, dp: int, dp_rank: int, micro: int) -> list[tuple[int, int]]:
    """(start, count) of each micro-batch this DP rank trains on within one global batch."""
    per_rank = global_batch // dp
    first = step_start + dp_rank * per_rank
    return [(first + m, micro) for m in range(0, per_rank, micro)]
