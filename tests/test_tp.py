"""Tensor parallelism: TP=2 (2 gloo processes) computes what TP=1 computes with the same weights, each rank
materializes only its slices (from the seed, no full model), and the slices written per rank reassemble
into exactly the 1-process weights."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import ModelConfig, RunConfig
from pipeline.model.tensor_parallel import padded_vocab
from pipeline.model.weights import ShardedWeights, write_shard
from pipeline.parallel.materialize import build_gpt, local_slices

# (style, tied head, vocab, key/value heads): 4 query heads; kv 2 = grouped-query, one kv head per TP rank
CASES = [("llama", True, 97, None), ("llama", False, 128, None), ("llama", False, 97, 2), ("gpt2", True, 97, None),
         ("gpt2", False, 100, None)]


def _cfg(style: str, tie: bool, vocab: int, kv_heads: int | None = None) -> ModelConfig:
    return ModelConfig(style=style, n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=vocab,
                       tie_embeddings=tie, ffn_hidden=64, n_kv_heads=kv_heads)


def gather_tp(t: torch.Tensor, p, group) -> torch.Tensor:
    """The full tensor of a sharded parameter's gradient (padding stripped): only tests gather."""
    shard = getattr(p, "tp_shard", None)
    if shard is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=shard.dim).narrow(shard.dim, 0, shard.length)


def _worker(rank: int, world: int, port: int, errors, shards) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    group = dist.group.WORLD
    layout = SimpleNamespace(tp=world, pp=1, rank=rank, tp_rank=rank, pp_rank=0, dp_rank=0, tp_group=group)
    try:
        for style, tie, vocab, kv_heads in CASES:
            cfg = _cfg(style, tie, vocab, kv_heads)
            run = RunConfig(model=cfg)
            full = build_gpt(cfg, seed=7)
            tp = build_gpt(cfg, seed=7, layout=layout, run=run)
            idx = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))
            targets = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(2))
            targets[0, :4] = -100  # ignored positions
            logits, loss = full(idx, targets)
            loss.backward()
            tp_logits, tp_loss = tp(idx, targets)
            tp_loss.backward()
            where = f"{style} tie={tie} vocab={vocab} kv_heads={kv_heads}"
            assert tp_logits.size(-1) == padded_vocab(vocab, world) // world, where
            torch.testing.assert_close(tp_loss, loss, rtol=1e-5, atol=1e-6, msg=where)
            gathered = [torch.empty_like(tp_logits) for _ in range(world)]
            dist.all_gather(gathered, tp_logits.detach().contiguous())
            torch.testing.assert_close(torch.cat(gathered, -1)[..., :vocab], logits, rtol=1e-5, atol=1e-5)
            grads = dict(full.named_parameters())
            for name, p in tp.named_parameters():
                g = gather_tp(p.grad, p, group)
                torch.testing.assert_close(g, grads[name].grad, rtol=1e-4, atol=1e-6, msg=f"{where} grad {name}")
            out = f"{shards}/{style}-{tie}-{vocab}-{kv_heads}"
            os.makedirs(out, exist_ok=True)
            write_shard(f"{out}/rank_{rank:05d}.safetensors", local_slices(tp, layout, zero3=False))
            dist.barrier()
            if rank == 0:
                state = ShardedWeights(out)
                ref = {k: v for k, v in full.state_dict().items() if not (tie and k == "head.lm_head.weight")}
                assert sorted(state.names()) == sorted(ref), where
                assert all(torch.equal(state.get(k), ref[k]) for k in ref), where
    except Exception as err:  # report to the parent; a raise here would only print
        errors.put(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tp2_equals_tp1_logits_loss_grads_and_consolidation(tmp_path):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_worker, args=(2, _port(), errors, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert not problems, "\n".join(problems)


def test_padded_vocab():
    assert padded_vocab(97, 2) == 128
    assert padded_vocab(128, 2) == 128
    assert padded_vocab(50257, 8) == 50688
