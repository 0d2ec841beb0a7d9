"""A corpus of 20,000 shards: start-up opens none of them beyond a rank's share of the check, reads open
them on demand, and the number of memory maps stays bounded (issue 26, item 5)."""

import os
import socket
from collections import Counter

import numpy as np
import pytest
from factories import fake_corpus

from data_prep.synthetic import many_shards
from pipeline.config import DataConfig, KilnError
from pipeline.data import corpus as corpus_mod
from pipeline.data.corpus import MAX_OPEN_SHARDS, PreparedCorpus, Windows
from pipeline.data.sampler import TrainData

SHARDS, TOKENS, VOCAB = 20_000, 4, 128


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return many_shards(tmp_path_factory.mktemp("many") / "c", SHARDS, tokens=TOKENS, vocab_size=VOCAB)


def mapped(directory) -> int:
    """Memory maps of this process onto files of the corpus (/proc/self/maps lists one line per map)."""
    with open("/proc/self/maps") as f:
        return sum(str(directory) in line for line in f)


def test_start_up_opens_only_its_share_and_each_shard_is_checked_once(big, monkeypatch):
    opened = Counter()  # what opening a shard (PreparedCorpus._open) was asked for: the real one takes ~1 ms
    monkeypatch.setattr(PreparedCorpus, "_open", lambda self, shard, prefix: opened.update([shard["path"]]))
    recorded = {str(big / s["path"][:-4]): s for s in PreparedCorpus(big, verify=False).manifest["shards"]}
    monkeypatch.setattr(corpus_mod, "shard_fingerprint", lambda prefix, root=None: recorded[str(prefix)])  # no reread
    cfg = DataConfig(paths=[str(big)], val_tokens=64)
    data = TrainData(cfg, block_size=32, seed=0, verify=False)  # the manifest only: no shard opened
    assert not opened and len(data.train.windows[0]) == (SHARDS * TOKENS - 1) // 32
    shares = []
    for rank in range(2):  # what the two ranks of world=2 check (TrainData.verify gathers their verdicts)
        opened.clear()
        PreparedCorpus(big, verify=False).verify(rank=rank, world=2)
        shares.append(set(opened))
        assert set(opened.values()) == {1} and abs(len(opened) - (SHARDS + 1) / 2) <= 1
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == SHARDS + 1


def test_reads_across_thousands_of_shards_keep_few_maps(big):
    corpus = PreparedCorpus(big, verify=False)
    stream = corpus.stream("train")
    assert len(stream) == SHARDS * TOKENS and stream.open_shards == 0 and mapped(big) == 0
    windows = Windows(stream, block_size=64)  # each window spans 17 shards
    expected = 3 + np.arange(len(stream) + 1) % (VOCAB - 3)  # many_shards' tokens, shard after shard
    direct = np.concatenate([np.fromfile(big / f"shards/train_{k:05d}.bin", np.uint16) for k in range(40)])
    np.testing.assert_array_equal(direct, expected[: len(direct)])
    most = 0
    for i in range(0, len(windows), 10):  # ~125 windows touching ~2,100 shards
        np.testing.assert_array_equal(windows[i], expected[i * 64 : i * 64 + 65])
        if i % 100 == 0:
            most = max(most, mapped(big))
    assert stream.open_shards == MAX_OPEN_SHARDS and 0 < most <= MAX_OPEN_SHARDS
    del windows, stream
    assert mapped(big) == 0  # dropping the stream unmaps its shards


@pytest.mark.fault
def test_a_rank_refuses_a_bad_shard_in_its_share(tmp_path):
    directory = fake_corpus(tmp_path / "c", shards=3)  # manifest order: train 0, 1, 2, val 0
    shard = directory / "shards" / "train_00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    corpus = PreparedCorpus(directory, verify=False)
    corpus.verify(rank=0, world=2)  # train 0 and 2: not its share
    with pytest.raises(KilnError, match="train_00001.bin/.idx: fingerprint .* does not match the manifest"):
        corpus.verify(rank=1, world=2)
    with pytest.raises(KilnError, match="train_00001.bin/.idx: fingerprint .* does not match the manifest"):
        TrainData(DataConfig(paths=[str(directory)]), block_size=16, seed=0)
    shard.with_suffix(".idx").unlink()  # a shard not opened at start: the read that reaches it says so
    stream = corpus.stream("train")
    with pytest.raises(KilnError, match="train_00001.bin/.idx: listed in .* but missing"):
        stream.read(0, len(stream))


def _verify_rank(rank: int, world: int, port: int, directory: str, found) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        TrainData(DataConfig(paths=[directory]), block_size=16, seed=0, rank=rank, world=world)
        found.put((rank, None))
    except KilnError as err:
        found.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.fault
def test_every_rank_stops_with_the_line_of_the_rank_that_found_it(tmp_path):
    """Two real ranks (gloo): only rank 1 checks the bad shard, and both raise its one line."""
    import torch.multiprocessing as mp

    directory = fake_corpus(tmp_path / "c", shards=3)
    shard = directory / "shards" / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = mp.get_context("spawn").Queue()
    mp.start_processes(_verify_rank, args=(2, port, str(directory), found), nprocs=2, start_method="spawn")
    lines = dict(found.get(timeout=60) for _ in range(2))
    assert lines[0] == lines[1] and "train_00001.bin: size" in lines[0], lines
