"""Parallelism applied to a plain model, in one place (after torchtitan's `parallelize_llama`).

    parallelize(module, layout, run):  expert parallelism -> tensor parallelism -> activation checkpointing
                                       -> loss -> compile

`module` is the whole GPT (PP = 1) or one pipeline stage's layer (pipeline_module.py); either way it
may still be on the meta device (materialize.py fills it afterwards). The model never learns about
ranks: TP swaps its layers for sharded ones (tensor_parallel.py), checkpointing wraps its blocks'
forward, the whole GPT takes its loss from the hidden states in chunks (loss.py), and torch.compile
takes each block on its own (`blocks`, the default on GPUs) or the module whole (`model`: the GPT with its
loss, or one stage's layer). With dropout under TP the
attention draws its masks from a TP-rank stream.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pipeline.config import RunConfig
from pipeline.model.gpt import GPT, Block, cross_entropy
from pipeline.model.layers import Attention
from pipeline.model.loss import ChunkedCrossEntropy
from pipeline.model.tensor_parallel import VocabParallelCrossEntropy, padded_vocab, parallelize_tp

_aten, _c10d, _functional = torch.ops.aten, torch.ops.c10d, torch.ops._c10d_functional
# selective checkpointing keeps what is costly to redo (matmuls, attention, reducing collectives) and recomputes
# the rest; a sequence-parallel all-gather is redone in backward (Megatron's choice: its output is tp times
# the size of its input), eager or compiled
KEEP = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default,
        _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _c10d.allreduce_.default,
        _functional.all_reduce.default, _functional.reduce_scatter_tensor.default}


def parallelize(module: nn.Module, layout, run: RunConfig) -> nn.Module:
    """Apply, in place and in this order: EP (ep > 1), TP (tp > 1), activation checkpointing, the loss,
    torch.compile."""
    m, t = run.model, run.train
    if run.parallel.ep > 1:
        from pipeline.parallel.expert_parallel import parallelize_ep

        parallelize_ep(module, run.parallel.ep)
    if layout.tp > 1:
        parallelize_tp(module, layout.tp_group, m.vocab_size, m.tie_embeddings, run.parallel.sequence_parallel)
        if m.dropout > 0:
            for attn in (x for x in module.modules() if isinstance(x, Attention)):
                _tp_dropout_stream(attn, layout.tp_rank)
    if t.activation_checkpointing != "none":
        for block in (x for x in module.modules() if isinstance(x, Block)):
            checkpointed(block, selective=t.activation_checkpointing == "selective",
                         width=m.n_embd if layout.tp > 1 and run.parallel.sequence_parallel else None)
    if isinstance(module, GPT):
        module.loss_fn = loss_fn(layout, run)
        module.hidden_loss = chunked_loss(layout, run)
    scope = compiling(run)
    if scope == "model":
        module.compile()
    elif scope == "blocks":
        compile_blocks(module)
    return module


def compiling(run: RunConfig) -> str:
    """train.compile as off / blocks / model, where `auto` means blocks on a GPU (CPU runs and tests stay
    quick to start), except under ZeRO-3, whose parameter gathering in module hooks a graph would trace."""
    if run.train.compile == "auto":
        return "blocks" if torch.cuda.is_available() and run.parallel.zero_stage < 3 else "off"
    return run.train.compile


def compile_blocks(module: nn.Module, backend: str = "inductor") -> int:
    """Regional compilation (torchtitan's per-block compile): each transformer block compiled on its own, the
    embedding, head and loss left eager. The blocks run the same code, so dynamo compiles it once and reuses
    the graph for every block: a cold compile costs one block's, not the whole depth's. Returns the count."""
    blocks = [x for x in module.modules() if isinstance(x, Block)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def chunked_loss(layout, run: RunConfig) -> ChunkedCrossEntropy | None:
    """The loss straight from the hidden states, train.loss_chunk tokens at a time (None: off); it makes its own
    logits, so it soft-caps them itself (model.logit_softcap)."""
    chunk, cap = run.train.loss_chunk, run.model.logit_softcap
    if not chunk:
        return None
    if layout.tp == 1:
        return ChunkedCrossEntropy(chunk, cap=cap)
    return loss_fn(layout, run).chunked(chunk, cap)


def loss_fn(layout, run: RunConfig):
    """Mean token cross-entropy; vocab-parallel (no full-vocabulary gather) under TP."""
    if layout.tp == 1:
        return cross_entropy
    vocab = run.model.vocab_size
    return VocabParallelCrossEntropy(layout.tp_group, layout.tp_rank, vocab, padded_vocab(vocab, layout.tp), layout.tp)


def _keep_costly(width: int | None, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep what KEEP names, recompute the rest. `width` (sequence parallelism: the model width): a matmul
    contracting over less than it is row-parallel (over a TP shard), its output whole-sequence and full-width,
    and the block needs only the reduce-scatter's 1/tp of it, which is kept; so it is not kept (backward redoes
    the attention's output projection, the one before the last activation it needs)."""
    if width and op in (_aten.mm.default, _aten.addmm.default) and args[-2].shape[-1] != width:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if op in KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(block: nn.Module, selective: bool = False, width: int | None = None) -> None:
    """Recompute the block in backward instead of keeping its activations (only while grads are on):
    all of it, or (selective) only its cheap ops, whose outputs are the bulk of the memory. `width`: see
    `_keep_costly` (sequence parallelism)."""
    plain = block.forward
    policy = functools.partial(_keep_costly, width)
    options = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)} if selective else {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(plain, x, use_reentrant=False, **options) if torch.is_grad_enabled() else plain(x)

    block.forward = forward


def _tp_dropout_stream(attn: nn.Module, tp_rank: int) -> None:
    """Attention-probability dropout on this rank's heads draws from its own stream (as Megatron's
    model-parallel RNG tracker does), so heads on different TP ranks get independent masks. The stream's
    seed is drawn from the default generator, which is the same on every TP rank and which activation
    checkpointing restores before recomputing, so a recomputed block repeats its masks exactly."""
    forks: list = []

    def enter(module, args):
        if module.training:
            seed = int(torch.randint(0, 2**62, (1,)))
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            fork = torch.random.fork_rng(devices=devices)
            fork.__enter__()
            torch.manual_seed(seed + tp_rank)
            forks.append(fork)

    def leave(module, args, output):
        if forks:
            forks.pop().__exit__(None, None, None)

    attn.register_forward_pre_hook(enter)
    attn.register_forward_hook(leave)
