"""pipeline/model/init.py: any slice of a parameter's starting value, drawn alone, is that slice of the whole
(so a TP rank draws only its share and every layout starts from the same model), across block edges."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.init import TILE, initial_slice


@pytest.mark.parametrize("shape", [(2 * TILE + 300, 3), (5, TILE + 77), (TILE + 10,), (3, 4)])
def test_a_slice_drawn_alone_is_that_slice_of_the_whole(shape):
    whole = initial_slice("normal", 0.02, shape, "7:blocks.0.mlp.w1.weight")
    assert whole.shape == shape and (whole.numel() < 100 or 0.018 < whole.std().item() < 0.022)
    for dim in range(len(shape)):
        n = shape[dim]
        for start, stop in [(0, n), (0, 1), (1, n - 1), (n // 3, 2 * n // 3), (n - 1, n), (TILE - 1, TILE + 1)]:
            if 0 <= start < stop <= n:
                got = initial_slice("normal", 0.02, shape, "7:blocks.0.mlp.w1.weight", (dim, start, stop))
                assert torch.equal(got, whole.narrow(dim, start, stop - start)), (dim, start, stop)
    if len(shape) == 2:  # a column slice's rows alone (a ZeRO-3 partition of a TP rank's slice)
        n, m = shape
        for r0, r1 in [(0, n), (n // 2, n), (TILE - 2, TILE + 3)]:
            r0, r1 = min(r0, n - 1), min(r1, n)
            got = initial_slice("normal", 0.02, shape, "7:blocks.0.mlp.w1.weight", (1, 1, m), rows=(r0, r1))
            assert torch.equal(got, whole[r0:r1, 1:m]), (r0, r1)


def test_values_depend_on_the_seed_and_the_parameter_only():
    a = initial_slice("normal", 1.0, (8, 8), "0:embed.wte.weight")
    assert torch.equal(a, initial_slice("normal", 1.0, (8, 8), "0:embed.wte.weight"))
    assert not torch.equal(a, initial_slice("normal", 1.0, (8, 8), "1:embed.wte.weight"))
    assert not torch.equal(a, initial_slice("normal", 1.0, (8, 8), "0:head.lm_head.weight"))
    assert torch.equal(initial_slice("ones", 0.0, (4, 6), "k", (1, 2, 5)), torch.ones(4, 3))


@pytest.mark.parametrize("dim", [0, 1])
def test_a_zero3_partition_of_a_tp_slice_draws_those_rows_of_it(dim):
    """materialize's ZeRO-3 path: rows [r0, r1) of a TP rank's slice (the last rank's holding vocabulary
    padding, zeros) equal those rows of the whole slice."""
    from pipeline.model.tensor_parallel import TPShard
    from pipeline.parallel.materialize import _slice

    shape = (10, 6)
    for rank in range(2):
        shard = TPShard(dim=dim, rank=rank, size=2, length=shape[dim], padded=shape[dim] + 2)
        whole = _slice("blocks.0.w", "normal", 1.0, shape, 3, None, "", shard, "cpu")
        for r0, r1 in [(0, whole.shape[0]), (1, 4), (whole.shape[0] - 2, whole.shape[0])]:
            got = _slice("blocks.0.w", "normal", 1.0, shape, 3, None, "", shard, "cpu", (r0, r1))
            assert torch.equal(got, whole[r0:r1]), (rank, r0, r1)
    assert whole.abs().sum() > 0 and (dim == 1 or whole[-2:].abs().sum() == 0)  # rank 1 along dim 0: 2 pad rows
