"""Activation memory of one transformer layer per rank: tensor parallelism with and without sequence parallelism.

What a layer keeps for backward is measured, not estimated: every tensor autograd saves while block 0 runs
forward (saved_tensors_hooks), counted once per storage, parameters left out. Each TP size runs as its own
group of gloo processes (CPU, fp32); each variant builds the model Kiln trains (build_gpt + parallelize) and
runs one forward of a micro-batch:

    tp=1                                   <- the reference of every line (same checkpointing)
    tp=N            no sequence parallelism: norms, residuals, the layer's input whole on every rank
    tp=N sp         parallel.sequence_parallel: those split over the sequence too (the two gathered
                    sub-block inputs stay whole; selective checkpointing gathers them again in backward)
each with activation checkpointing none (what autograd saves) and selective (the block's input, which the
checkpoint keeps, plus what the selective policy caches: the hooks above do not see inside a checkpoint).

    PYTHONPATH=. python bench/activation_memory.py [--tp 2 4 --dim 512 --heads 8 --seq 1024 --batch 1]

Prints JSON lines {"bench", "value", "unit", "reference", "ratio", ...}; value and reference (tp=1) in MiB per
layer per rank, `without_sp` the same TP size without sequence parallelism, and `bytes_per_sbh`: the value over
s·b·h (kiln plan's estimate, after Korthikanti et al., counts 16-bit bytes: 34 at tp=1, 10 + 24/tp under TP,
34/tp + 4(1 - 1/tp) with sequence parallelism and no checkpointing; these are fp32, so twice that scale).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2**20


def saved_bytes(model, idx: torch.Tensor, block: torch.nn.Module) -> int:
    """Bytes autograd saves for backward while `block` runs forward (distinct storages, no parameters)."""
    return sum(saved_storages(model, idx, block))


def saved_storages(model, idx: torch.Tensor, block: torch.nn.Module) -> list[int]:
    """The size in bytes of each distinct storage autograd saves while `block` runs forward (no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    inside = []

    def pack(t: torch.Tensor):
        if inside:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    enter = block.register_forward_pre_hook(lambda m, a: inside.append(1))
    leave = block.register_forward_hook(lambda m, a, o: inside.clear())
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
    finally:
        enter.remove()
        leave.remove()
    return list(seen.values())


def cached_storages(model, idx: torch.Tensor, block: torch.nn.Module) -> list[int]:
    """Selective checkpointing: the block's input (the checkpoint keeps it) and each distinct storage the
    selective policy caches while `block` runs forward. The model must be built after `watch_policy()`."""
    seen: dict[int, int] = {}

    def enter(module, args):
        storage = args[0].untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        _WATCH.append(seen)

    first = block.register_forward_pre_hook(enter)
    last = block.register_forward_hook(lambda m, a, o: _WATCH.clear())
    try:
        model(idx, idx)
    finally:
        first.remove()
        last.remove()
    return list(seen.values())


_WATCH: list[dict] = []


def watch_policy() -> None:
    """Wrap parallelize's selective-checkpointing policy so `cached_storages` sees what it keeps."""
    from torch.utils.checkpoint import CheckpointPolicy

    import pipeline.parallel.parallelize as parallelize

    policy = parallelize._keep_costly

    def watched(width, ctx, op, *args, **kwargs):
        decision = policy(width, ctx, op, *args, **kwargs)
        if _WATCH and not ctx.is_recompute and decision == CheckpointPolicy.MUST_SAVE:
            outputs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
            for t in outputs:
                if isinstance(t, torch.Tensor):
                    _WATCH[0][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return decision

    parallelize._keep_costly = watched


def variants(tp: int) -> list[tuple[bool, str]]:
    return [(sp, ckpt) for sp in ((False, True) if tp > 1 else (False,)) for ckpt in ("none", "selective")]


def _worker(rank: int, tp: int, port: int, args, out) -> None:
    import torch.distributed as dist

    from pipeline.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
    from pipeline.parallel.materialize import build_gpt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    torch.set_num_threads(1)
    layout = SimpleNamespace(tp=tp, pp=1, rank=rank, tp_rank=rank, pp_rank=0, dp_rank=0, tp_group=dist.group.WORLD)
    cfg = ModelConfig(n_layer=2, n_head=args.heads, n_embd=args.dim, block_size=args.seq, vocab_size=1024)
    idx = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    watch_policy()
    for sp, ckpt in variants(tp):
        run = RunConfig(model=cfg, parallel=ParallelConfig(tp=tp, sequence_parallel=sp),
                        train=TrainConfig(compile=False, activation_checkpointing=ckpt))
        model = build_gpt(cfg, seed=1, layout=layout, run=run)
        kept = cached_storages if ckpt == "selective" else saved_storages
        value = sum(kept(model, idx, model.blocks[0]))
        if rank == 0:
            out.put((tp, sp, ckpt, value))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    out = mp.get_context("spawn").Queue()
    results = {}
    for tp in [1, *args.tp]:
        mp.start_processes(_worker, args=(tp, _port(), args, out), nprocs=tp, start_method="spawn", join=True)
        for _ in variants(tp):
            tp_, sp, ckpt, value = out.get()
            results[tp_, sp, ckpt] = value
    sbh = args.seq * args.batch * args.dim
    for (tp, sp, ckpt), value in sorted(results.items()):
        ref = results[1, False, ckpt]
        print(json.dumps({"bench": f"activation_memory/tp{tp}{'_sp' if sp else ''}_{ckpt}",
                          "value": round(value / MIB, 2), "unit": "MiB per layer per rank",
                          "reference": round(ref / MIB, 2), "ratio": round(value / ref, 3),
                          "bytes_per_sbh": round(value / sbh, 2),
                          "without_sp": round(results[tp, False, ckpt] / MIB, 2), "shape": vars(args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
