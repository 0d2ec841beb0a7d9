"""The throughput parts of the model, on CPU: the chunked loss equals the plain one (value and gradients),
selective checkpointing recomputes only cheap ops and changes no gradient, and the whole GPT with its loss
(and a tensor-parallel block) compiles into one graph."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import ModelConfig, RunConfig, TrainConfig
from pipeline.model.gpt import GPT
from pipeline.model.loss import ChunkedCrossEntropy
from pipeline.parallel.parallelize import checkpointed, parallelize


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "vocab_size": 97, **kw})


def _grads(model: GPT, idx, targets):
    model.zero_grad()
    logits, loss = model(idx, targets)
    loss.backward()
    return logits, loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [7, 1000])  # uneven chunks; one chunk shorter than asked
def test_chunked_loss_equals_plain(tie, chunk):
    torch.manual_seed(0)
    model = GPT(tiny(tie_embeddings=tie))
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    targets[0, :5] = -100  # ignored
    _, loss, ref = _grads(model, idx, targets)
    model.hidden_loss = ChunkedCrossEntropy(chunk)
    logits, chunked, grads = _grads(model, idx, targets)
    assert logits is None  # the full logits were never built
    torch.testing.assert_close(chunked, loss)
    for r, g in zip(ref, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same value, no gradient work
        torch.testing.assert_close(model(idx, targets)[1], loss)


def test_chunked_loss_scales_incoming_gradient():
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    t = torch.randint(0, 13, (10,))
    (3.0 * ChunkedCrossEntropy(4)(h, w, t)).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * torch.nn.functional.cross_entropy(h2 @ w2.t(), t)).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._opname] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_selective_checkpointing_recomputes_only_cheap_ops(style):
    """Backward runs no extra matmul or attention under selective checkpointing (full runs them again), but does
    recompute the element-wise ops (the activation), and the gradients are those of no checkpointing."""
    torch.manual_seed(0)
    model = GPT(tiny(style=style))
    idx = torch.randint(0, 97, (2, 16))
    act = "silu" if style == "llama" else "gelu"
    backward = {}
    for mode in ("none", "selective", "full"):
        if mode != "none":
            for block in model.blocks:
                block.forward = block.__class__.forward.__get__(block)  # plain again, then wrap
                checkpointed(block, selective=mode == "selective")
        model.zero_grad()
        loss = model(idx, idx)[1]
        with _Ops() as ops:
            loss.backward()
        backward[mode] = (ops.counts, [p.grad.clone() for p in model.parameters()])
    none, selective, full = (backward[m][0] for m in ("none", "selective", "full"))
    heavy = ("mm", "addmm", "_scaled_dot_product_flash_attention_for_cpu")
    assert all(selective[op] == none[op] for op in heavy), (selective, none)
    assert full["mm"] + full["addmm"] > none["mm"] + none["addmm"]  # the mutant-proof contrast: full redoes them
    assert none[act] == 0 and selective[act] == full[act] == 2  # one per layer, recomputed
    for mode in ("selective", "full"):
        for a, b in zip(backward["none"][1], backward[mode][1], strict=True):
            torch.testing.assert_close(a, b)


def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


def test_whole_model_with_chunked_loss_compiles_without_graph_breaks():
    torch.manual_seed(0)
    run = RunConfig(model=tiny(), train=TrainConfig(compile=False, loss_chunk=20, activation_checkpointing="selective"))
    model = parallelize(GPT(run.model), SimpleNamespace(tp=1), run)
    idx = torch.randint(0, 97, (2, 16))
    assert _graph_breaks(model, idx, idx) == 0


def test_tp_block_compiles_without_graph_breaks():
    """A block with its layers swapped for tensor-parallel ones, collectives included (a TP group of this one
    process: the same code path as TP=2), with and without sequence parallelism."""
    from pipeline.model.gpt import Block
    from pipeline.model.tensor_parallel import parallelize_tp

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for sp in (False, True):
            block = parallelize_tp(Block(tiny()), dist.group.WORLD, 97, tied=True, sequence_parallel=sp)
            assert _graph_breaks(block, torch.randn(2, 16, 32)) == 0, f"sequence_parallel={sp}"
    finally:
        dist.destroy_process_group()


def test_regional_compile_builds_one_graph_for_every_block():
    """train.compile=blocks compiles each block on its own, and dynamo reuses one graph for all of them: a cold
    compile costs one block's at any depth (the whole-model graph grows with it)."""
    from torch._dynamo.utils import counters

    from pipeline.model.gpt import Block
    from pipeline.parallel.parallelize import compile_blocks

    torch.manual_seed(0)
    model, idx = GPT(tiny(n_layer=3)), torch.randint(0, 97, (2, 16))
    _, eager, eager_grads = _grads(model, idx, idx)
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, backend="eager") == 3
    _, loss, grads = _grads(model, idx, idx)
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)
    for scope, whole, blocks in (("blocks", False, True), (True, False, True), ("model", True, False), ("off", False, False)):
        run = RunConfig(model=tiny(), train=TrainConfig(compile=scope))
        m = parallelize(GPT(run.model), SimpleNamespace(tp=1), run)
        assert (m._compiled_call_impl is not None) == whole, scope
        assert all((b._compiled_call_impl is not None) == blocks for b in m.modules() if isinstance(b, Block)), scope
