"""Reading a prepared corpus as one token stream; refusing shards that do not match the manifest."""

import numpy as np
import pytest
from factories import fake_corpus

from pipeline.config import KilnError
from pipeline.data.corpus import PreparedCorpus, Windows


def test_stream_crosses_shard_boundaries(tmp_path):
    corpus = PreparedCorpus(fake_corpus(tmp_path / "c", shards=3))
    stream = corpus.stream("train")
    everything = np.concatenate([corpus.dataset(s).tokens.astype(np.int64) for s in corpus.shards("train")])
    assert len(stream) == corpus.manifest["tokens"]["train"] == len(everything)
    for start, length in [(0, 5), (stream.lengths[0] - 3, 7), (len(stream) - 4, 4)]:
        np.testing.assert_array_equal(stream.read(start, length), everything[start : start + length])
    with pytest.raises(IndexError):
        stream.read(len(stream) - 1, 2)
    windows = Windows(stream, block_size=16)
    assert len(windows) == (len(stream) - 1) // 16
    np.testing.assert_array_equal(windows[1], everything[16:33])


@pytest.mark.fault
def test_tampered_shard_is_refused(tmp_path):
    directory = fake_corpus(tmp_path / "c")
    shard = directory / "shards" / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(KilnError, match="train_00000.bin/.idx: fingerprint .* does not match the manifest"):
        PreparedCorpus(directory)
    with pytest.raises(KilnError, match="train_00000.bin: digest .* does not match manifest"):
        PreparedCorpus(directory, verify=False).verify_full()
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    PreparedCorpus(directory)  # restored: accepted again
    (directory / "shards" / "val_00000.idx").unlink()
    with pytest.raises(KilnError, match="missing"):
        PreparedCorpus(directory, verify=False).verify()


def test_missing_manifest(tmp_path):
    with pytest.raises(KilnError, match="manifest.json: not found"):
        PreparedCorpus(tmp_path)
