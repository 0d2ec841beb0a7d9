"""`Weights.rows`: a rank rebuilding its tensor-parallel slice (a resume at another layout, `train.init_from`)
gets exactly the rows of the full tensor, and reads only those: of a MODEL file, just their bytes; of a
checkpoint's per-rank files, only the files (and rows) that hold them — TP slices along the same or another
dim, vocabulary padding, ZeRO-3 flat partitions."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.weights import FileWeights, ShardedWeights, write_shard, write_tensors

FULL = {"w": torch.arange(10 * 6, dtype=torch.float32).view(10, 6), "v": torch.arange(7 * 4, dtype=torch.float32).view(7, 4)}


class Counting:
    """A safetensors handle that counts the elements each read hands back."""

    def __init__(self, handle, log: list):
        self.handle, self.log = handle, log

    def get_slice(self, name):
        handle, log = self.handle, self.log

        class Slice:
            def get_shape(self):
                return handle.get_slice(name).get_shape()

            def get_dtype(self):
                return handle.get_slice(name).get_dtype()

            def __getitem__(self, index):
                t = handle.get_slice(name)[index]
                log.append(t.numel())
                return t

        return Slice()

    def get_tensor(self, name):
        t = self.handle.get_tensor(name)
        self.log.append(t.numel())
        return t

    def __getattr__(self, key):
        return getattr(self.handle, key)


def counted(weights):
    log: list[int] = []
    if isinstance(weights, FileWeights):
        weights.file = Counting(weights.file, log)
    else:
        weights.files = {f: Counting(h, log) for f, h in weights.files.items()}
    return weights, log


def tp_checkpoint(directory, dim: int, ranks: int, padded: dict[str, int] | None = None, flat: int = 1):
    """The per-rank weight files of a checkpoint at TP=`ranks` along `dim` (padded to `padded[name]` rows
    there), each TP slice further split into `flat` ZeRO-3 partitions."""
    directory.mkdir()
    files: dict[int, list] = {}
    for name, full in FULL.items():
        length = (padded or {}).get(name, -(-full.size(dim) // ranks) * ranks)  # (7 rows at TP=2: padded to 8)
        if length > full.size(dim):
            pad = list(full.shape)
            pad[dim] = length - full.size(dim)
            full = torch.cat([full, full.new_zeros(pad)], dim=dim)
        step = length // ranks
        for r in range(ranks):
            local = full.narrow(dim, r * step, step).contiguous()
            spec_tp = [dim, r * step, (r + 1) * step, length] if ranks > 1 else None
            n = local.numel()
            for k in range(flat):
                a, b = k * n // flat, (k + 1) * n // flat
                piece = local.reshape(-1)[a:b].clone() if flat > 1 else local
                spec = {"shape": list(FULL[name].shape), "tp": spec_tp, "flat": [a, b] if flat > 1 else None}
                files.setdefault(r * flat + k, []).append((name, piece, spec))
    for i, slices in files.items():
        write_shard(directory / f"rank_{i:05d}.safetensors", slices)
    return ShardedWeights(directory)


@pytest.mark.parametrize("layout", ["whole", "tp0", "tp1", "tp0-padded", "zero3", "tp0-zero3"])
def test_rows_of_every_checkpoint_layout_are_the_full_tensors_rows(tmp_path, layout):
    dim, ranks, padded, flat = {"whole": (0, 1, None, 1), "tp0": (0, 2, None, 1), "tp1": (1, 2, None, 1), "tp0-padded": (0, 4, {"v": 8}, 1),
                                "zero3": (0, 1, None, 3), "tp0-zero3": (0, 2, None, 2)}[layout]
    weights = tp_checkpoint(tmp_path / "ckpt", dim, ranks, padded, flat)
    for name, full in FULL.items():
        assert torch.equal(weights.get(name), full)
        for d in range(full.dim()):
            for start, stop in [(0, full.size(d)), (0, 1), (1, full.size(d) - 1), (full.size(d) // 2, full.size(d)),
                                (full.size(d), full.size(d))]:  # (the last: a rank holding padding alone)
                assert torch.equal(weights.rows(name, d, start, stop), full.narrow(d, start, stop - start)), (name, d, start)


def test_a_model_file_reads_only_the_rows_asked_for(tmp_path):
    path = tmp_path / "model.safetensors"
    write_tensors(path, FULL.items(), [(n, t.dtype, tuple(t.shape)) for n, t in FULL.items()])
    weights, log = counted(FileWeights(path))
    assert torch.equal(weights.rows("w", 0, 5, 10), FULL["w"][5:]) and log == [5 * 6]
    assert torch.equal(weights.rows("w", 1, 0, 3), FULL["w"][:, :3]) and log[-1] == 10 * 3


def test_a_checkpoint_reads_only_the_slices_that_hold_the_rows(tmp_path):
    """TP=2 along dim 0 written, TP=2 read along the same dim: each new rank reads its old rank's file alone;
    along the other dim: half of each file. A ZeRO-3 checkpoint: just the partitions' elements in range."""
    weights, log = counted(tp_checkpoint(tmp_path / "tp", 0, 2))
    assert torch.equal(weights.rows("w", 0, 5, 10), FULL["w"][5:]) and log == [5 * 6]
    log.clear()
    assert torch.equal(weights.rows("w", 1, 3, 6), FULL["w"][:, 3:]) and sum(log) == 10 * 3
    weights, log = counted(tp_checkpoint(tmp_path / "z3", 0, 1, flat=3))
    assert torch.equal(weights.rows("w", 0, 0, 2), FULL["w"][:2]) and sum(log) == 2 * 6


def test_a_rank_whose_tp_slice_is_padding_alone_gets_zero_rows(tmp_path):
    """Vocabulary 10 over 4 TP ranks padded to 16: rank 3 holds rows 12..16, all padding; rank 2 rows 8..10 and
    two of padding. Read from weights and drawn from the seed alike."""
    from pipeline.model.tensor_parallel import TPShard
    from pipeline.parallel.materialize import _slice

    path = tmp_path / "model.safetensors"
    write_tensors(path, FULL.items(), [(n, t.dtype, tuple(t.shape)) for n, t in FULL.items()])
    for source in (FileWeights(path), tp_checkpoint(tmp_path / "tp", 0, 2), None):
        for rank, real in ((2, 2), (3, 0)):
            got = _slice("w", "normal", 0.02, (10, 6), 0, source, "test", TPShard(0, rank, 4, 10, 16), "cpu")
            assert got.shape == (4, 6) and torch.equal(got[real:], torch.zeros(4 - real, 6))
            if source is not None:
                assert torch.equal(got[:real], FULL["w"][8:8 + real])
