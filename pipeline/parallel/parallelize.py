"""Parallelism applied to a plain model, in one place (after torchtitan's `parallelize_llama`).

    parallelize(module, layout, run):  tensor parallelism -> activation checkpointing -> compile

`module` is the whole GPT (PP = 1) or one pipeline stage's layer (pipeline_module.py); either way it
may still be on the meta device (materialize.py fills it afterwards). The model never learns about
ranks: TP swaps its layers for sharded ones (tensor_parallel.py), checkpointing and compile wrap its
blocks' forward, and with dropout under TP the attention draws its masks from a TP-rank stream.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import RunConfig
from pipeline.model.gpt import GPT, Attention, Block, cross_entropy
from pipeline.model.tensor_parallel import VocabParallelCrossEntropy, padded_vocab, parallelize_tp


def parallelize(module: nn.Module, layout, run: RunConfig) -> nn.Module:
    """Apply, in place and in this order: TP (tp > 1), activation checkpointing, torch.compile."""
    m, t = run.model, run.train
    if layout.tp > 1:
        parallelize_tp(module, layout.tp_group, m.vocab_size, m.tie_embeddings)
        if m.dropout > 0:
            for attn in (x for x in module.modules() if isinstance(x, Attention)):
                _tp_dropout_stream(attn, layout.tp_rank)
    blocks = [x for x in module.modules() if isinstance(x, Block)]
    if t.activation_checkpointing:
        for block in blocks:
            checkpointed(block)
    if t.compile:  # per block: graph breaks at TP collectives stay local, PP stages compile alike
        for block in blocks:
            block.compile()
    if isinstance(module, GPT):
        module.loss_fn = loss_fn(layout, run)
    return module


def loss_fn(layout, run: RunConfig):
    """Mean token cross-entropy; vocab-parallel (no full-vocabulary gather) under TP."""
    if layout.tp == 1:
        return cross_entropy
    vocab = run.model.vocab_size
    return VocabParallelCrossEntropy(layout.tp_group, layout.tp_rank, vocab, padded_vocab(vocab, layout.tp), layout.tp)


def checkpointed(block: nn.Module) -> None:
    """Recompute the block in backward instead of keeping its activations (only while grads are on)."""
    plain = block.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return checkpoint(plain, x, use_reentrant=False) if torch.is_grad_enabled() else plain(x)

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
