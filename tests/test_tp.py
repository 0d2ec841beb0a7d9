"""Tensor parallelism: TP=2 (2 gloo processes) computes what TP=1 computes with the same weights (the chunked
loss from hidden states and the logits-based vocab-parallel loss alike), each rank materializes only its slices
(from the seed, no full model), the slices written per rank reassemble into exactly the 1-process weights, and
a layer costs Megatron's collectives: 2 all-reduces forward and 2 backward (no more with selective
checkpointing, which keeps collective outputs; full checkpointing re-runs the attention's forward all-reduce,
and stops recomputing before the MLP's, whose output backward does not need)."""

from __future__ import annotations

import itertools
import os
import socket
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from pipeline.model.tensor_parallel import padded_vocab
from pipeline.model.weights import ShardedWeights, write_shard
from pipeline.parallel.materialize import build_gpt, local_slices

# (style, tied head, vocab, key/value heads[, architecture options]): 4 query heads; kv 2 = grouped-query, one kv
# head per TP rank. The options: q/k norms (whole on each rank, gradients summed), the ReLU² MLP, a soft cap small
# enough to bend these logits (in the chunked loss and the logits alike)
OPTIONS = {"qk_norm": True, "mlp": "relu2", "logit_softcap": 0.3}
CASES = [("llama", True, 97, None), ("llama", False, 128, None), ("llama", False, 97, 2), ("gpt2", True, 97, None),
         ("gpt2", False, 100, None), ("mixtral", False, 97, 2), ("llama", True, 100, 2, OPTIONS)]
# a mixture of experts: each expert split like a dense MLP, the router whole (it routes alike on every TP rank);
# its tokens are routed per rank, so no sequence parallelism
EXPERTS = {"mixtral": {"n_experts": 4, "moe_shared_hidden": 32}}


def _cfg(style: str, tie: bool, vocab: int, kv_heads: int | None = None, options: dict | None = None) -> ModelConfig:
    return ModelConfig(style=style, n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=vocab,
                       tie_embeddings=tie, ffn_hidden=64, n_kv_heads=kv_heads, **EXPERTS.get(style, {}), **(options or {}))


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
        for case, sp in itertools.product(CASES, (False, True)):
            style, tie, vocab, kv_heads = case[:4]
            cfg = _cfg(*case)
            if sp and cfg.n_experts:
                continue
            run = RunConfig(model=cfg, parallel=ParallelConfig(tp=world, sequence_parallel=sp),
                            train=TrainConfig(loss_chunk=20))  # 48 tokens: chunks of 20, 20, 8
            full = build_gpt(cfg, seed=7)
            tp = build_gpt(cfg, seed=7, layout=layout, run=run)
            idx = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(1))
            targets = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(2))
            targets[0, :4] = -100  # ignored positions
            logits, loss = full(idx, targets)
            loss.backward()
            tp_logits, _ = tp(idx)
            where = f"{style} tie={tie} vocab={vocab} kv_heads={kv_heads} {case[4:]} sequence_parallel={sp}"
            assert tp_logits.size(-1) == padded_vocab(vocab, world) // world, where
            gathered = [torch.empty_like(tp_logits) for _ in range(world)]
            dist.all_gather(gathered, tp_logits.detach().contiguous())
            torch.testing.assert_close(torch.cat(gathered, -1)[..., :vocab], logits, rtol=1e-5, atol=1e-5)
            grads = dict(full.named_parameters())
            for how in ("chunked", "logits"):  # the loss from hidden states (PP = 1), and from logits (PP)
                tp.zero_grad()
                tp_loss = tp(idx, targets)[1] if how == "chunked" else tp.balanced(tp.loss_fn(tp(idx)[0], targets))
                tp_loss.backward()
                torch.testing.assert_close(tp_loss, loss, rtol=1e-5, atol=1e-6, msg=f"{where} {how}")
                for name, p in tp.named_parameters():
                    g = gather_tp(p.grad, p, group)
                    torch.testing.assert_close(g, grads[name].grad, rtol=1e-4, atol=1e-6, msg=f"{where} {how} {name}")
            out = f"{shards}/{style}-{tie}-{vocab}-{kv_heads}-{sp}"
            os.makedirs(out, exist_ok=True)
            write_shard(f"{out}/rank_{rank:05d}.safetensors", local_slices(tp, layout, zero3=False))
            dist.barrier()
            if rank == 0:
                state = ShardedWeights(out)
                ref = {k: v for k, v in full.state_dict().items() if not (tie and k == "head.lm_head.weight")}
                assert sorted(state.names()) == sorted(ref), where
                assert all(torch.equal(state.get(k), ref[k]) for k in ref), where
        _check_collective_counts(layout, world)
        _check_sequence_parallel_keeps_shards(layout, world)
        _check_tied_head_stage_boundary(layout, world)
    except Exception as err:  # report to the parent; a raise here would only print
        errors.put(f"rank {rank}: {type(err).__name__}: {err}")
    finally:
        dist.destroy_process_group()


NOT_COMMUNICATION = ("wait_tensor", "_wrap_tensor_autograd")  # functional collectives' bookkeeping ops


MATMULS = ("mm", "addmm")


class _Collectives(TorchDispatchMode):
    """Counts collectives (and matmuls) as the dispatcher runs them: one that selective checkpointing serves
    from its cache (no communication) is not counted, one it re-runs is."""

    def __init__(self):
        super().__init__()
        self.phase, self.counts = "forward", {"forward": Counter(), "backward": Counter()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and func._opname not in NOT_COMMUNICATION:
            self.counts[self.phase][func._opname] += 1
        elif func.namespace == "aten" and func._opname in MATMULS:
            self.counts[self.phase]["matmul"] += 1
        return func(*args, **(kwargs or {}))


def count_collectives(model, idx, targets) -> dict[str, Counter]:
    """Collectives of one micro-batch by phase (forward, backward) and op; matmuls under "matmul"."""
    with _Collectives() as mode:
        _, loss = model(idx, targets)
        mode.phase = "backward"
        loss.backward()
    return mode.counts


def _check_collective_counts(layout, world: int) -> None:
    """Per layer per micro-batch: 2 all-reduces forward (attention and MLP outputs) and 2 backward (their shared
    inputs: one for q/k/v, one for gate/up). Besides the layers: the embedding's forward all-reduce, the loss's two
    (max, then the stacked target logit and sum of exponentials) and, in backward, the head input's one.

    Sequence parallel: each all-reduce becomes an all-gather (inputs) or reduce-scatter (outputs) forward, the
    reverse backward, plus one all-reduce per norm for its weight's gradient; selective checkpointing re-gathers
    the inputs in backward instead of keeping them whole (Megatron's count); the head gathers the sequence and
    the embedding's output is split (backward all-gather)."""
    layers = 3
    cfg = ModelConfig(n_layer=layers, n_head=4, n_embd=32, block_size=16, vocab_size=100, ffn_hidden=64)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    ar, ag, rs = "allreduce_", "all_gather_into_tensor", "reduce_scatter_tensor"
    expected = {  # (sequence_parallel, checkpointing) -> forward, backward
        (False, "none"): ({ar: 2 * layers + 1 + 2}, {ar: 2 * layers + 1}),
        (False, "selective"): ({ar: 2 * layers + 1 + 2}, {ar: 2 * layers + 1}),
        (False, "full"): ({ar: 2 * layers + 1 + 2}, {ar: 3 * layers + 1}),
        (True, "none"): ({ag: 2 * layers + 1, rs: 2 * layers, ar: 1 + 2},
                         {rs: 2 * layers + 1, ag: 2 * layers + 1, ar: 2 * layers + 1}),
        (True, "selective"): ({ag: 2 * layers + 1, rs: 2 * layers, ar: 1 + 2},
                              {rs: 2 * layers + 1, ag: 4 * layers + 1, ar: 2 * layers + 1}),
        (True, "full"): ({ag: 2 * layers + 1, rs: 2 * layers, ar: 1 + 2},
                         {rs: 3 * layers + 1, ag: 4 * layers + 1, ar: 2 * layers + 1}),
    }
    grads, matmuls = {}, {}
    for (sp, mode), (forward, backward) in expected.items():
        run = RunConfig(model=cfg, parallel=ParallelConfig(tp=world, sequence_parallel=sp),
                        train=TrainConfig(activation_checkpointing=mode))
        model = build_gpt(cfg, seed=7, layout=layout, run=run)
        counts = count_collectives(model, idx, idx)
        matmuls[sp, mode] = counts["backward"].pop("matmul"), counts["forward"].pop("matmul")
        want = {"forward": Counter(forward), "backward": Counter(backward)}
        assert counts == want, f"sequence_parallel={sp} checkpointing {mode}: {counts} != {want}"
        grads[sp, mode] = [p.grad for p in model.parameters()]
    # selective recomputes no matmul; under sequence parallelism it keeps no row-parallel matmul output (whole
    # sequence), so backward redoes the attention's output projection (the MLP's is never needed again)
    assert matmuls[False, "selective"] == matmuls[False, "none"], matmuls
    assert matmuls[True, "selective"][0] == matmuls[True, "none"][0] + layers, matmuls
    for key, g in grads.items():  # recomputing changes no gradient (a collective re-run on saved data would)
        for a, b in zip(grads[False, "none"], g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"sequence_parallel, checkpointing: {key}")


def _check_sequence_parallel_keeps_shards(layout, world: int) -> None:
    """What a layer saves for backward (bench/activation_memory.py's count, distinct storages): without sequence
    parallelism the whole sequence's activations between the TP regions (layer input, norm outputs, residual sum)
    are kept on every rank; with it, only the two gathered sub-block inputs are that size, the rest is 1/tp; with
    selective checkpointing, nothing is."""
    from bench.activation_memory import cached_storages, saved_bytes, saved_storages, watch_policy

    # MLP width = n_embd: a rank's MLP activations (B, T, d/tp) are not mistaken for whole ones
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100, ffn_hidden=32)
    idx = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(3))  # B = 1: slices are views
    whole = idx.numel() * cfg.n_embd * 4  # fp32 bytes of one (B, T, d) activation
    kept = {}
    for sp in (False, True):
        run = RunConfig(model=cfg, parallel=ParallelConfig(tp=world, sequence_parallel=sp))
        model = build_gpt(cfg, seed=7, layout=layout, run=run)
        sizes = saved_storages(model, idx, model.blocks[0])
        kept[sp] = sum(sizes)
        if sp:
            assert sorted(n for n in sizes if n >= whole) == [whole, whole], sizes
        else:
            assert sum(n >= whole for n in sizes) >= 5, sizes
    assert kept[True] < kept[False] and kept[True] == saved_bytes(model, idx, model.blocks[0]), kept
    # selective checkpointing keeps no whole-sequence activation at all: the gathered inputs are gathered again
    # in backward, and of a row-parallel matmul only the reduce-scatter's 1/tp is kept
    watch_policy()
    run = RunConfig(model=cfg, parallel=ParallelConfig(tp=world, sequence_parallel=True),
                    train=TrainConfig(activation_checkpointing="selective"))
    model = build_gpt(cfg, seed=7, layout=layout, run=run)
    sizes = cached_storages(model, idx, model.blocks[0])
    assert max(sizes) < whole and sum(sizes) < 0.75 * kept[True], (sizes, kept)


def _check_tied_head_stage_boundary(layout, world: int) -> None:
    """Pipeline parallelism with a tied head: the final norm and the tied embedding may be on different stages.
    Without sequence parallelism DeepSpeed sends each TP rank 1/tp of what crosses a stage boundary and gathers
    the pieces, so the norm's output and the gradient sent back for it must be the same on every TP rank, and
    equal to one process's."""
    from pipeline.model.tensor_parallel import tp_input
    from pipeline.parallel.parallelize import loss_fn
    from pipeline.parallel.pipeline_module import EmbeddingPipe, FinalNormPipe, tied_logits

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=100, ffn_hidden=64)
    run = RunConfig(model=cfg, parallel=ParallelConfig(tp=world, pp=2), train=TrainConfig(seed=7))
    ctx = {"run": run, "layout": layout, "device": "cpu", "dtype": torch.float32}
    norm, embed = FinalNormPipe(ctx), EmbeddingPipe(ctx)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    targets = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    sent = norm(x).detach().requires_grad_()  # what crosses the boundary
    loss_fn(layout, run)(tied_logits(tp_input(layout.tp_group, False), embed, sent), targets).backward()
    full = build_gpt(cfg, seed=7)
    ref = full.head.norm(x).detach().requires_grad_()
    cross_entropy_of = full.loss_fn(F.linear(ref, full.embed.wte.weight), targets)
    cross_entropy_of.backward()
    for name, t in (("activation", sent.detach()), ("gradient", sent.grad)):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        assert all(torch.equal(parts[0], p) for p in parts), f"the {name} sent across the stage differs per TP rank"
    torch.testing.assert_close(sent.grad, ref.grad, rtol=1e-5, atol=1e-7)


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
