"""Numbers to compare compressed models with their teacher: perplexity, bits/byte, tokens/s, size on disk.

A small stand-alone evaluator (mean next-token cross-entropy over the first
windows of a split) so post-training can be measured before `kiln eval` exists;
the lead folds it into pipeline/evaluate.py later.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.post.common import stack, windows


def byte_lengths(tokenizer: str | Path, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (sentencepiece): byte pieces 1, control/unknown 0."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out = torch.zeros(vocab_size, dtype=torch.float64)
    for i in range(min(vocab_size, sp.get_piece_size())):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, data_dir: str | Path, split: str = "val", max_windows: int | None = 64,
             batch_size: int = 8, block_size: int | None = None, tokenizer: str | Path | None = None) -> dict:
    """Mean CE (nats/token) over the first `max_windows` windows of `split`, and what follows from it."""
    model.eval()
    device = next(model.parameters()).device
    block_size = block_size or model.cfg.block_size
    win = windows(data_dir, split, block_size)
    n = len(win) if max_windows is None else min(max_windows, len(win))
    nll, tokens, elapsed = 0.0, 0, 0.0
    targets_all = []
    if n:  # warm-up: the first call pays one-time costs (allocator, kernels), not the model
        model(stack(win, range(min(n, batch_size)))[0].to(device))
    for start in range(0, n, batch_size):
        x, y = stack(win, range(start, min(n, start + batch_size)))
        t0 = time.perf_counter()
        logits, _ = model(x.to(device))
        nll += F.cross_entropy(logits.float().flatten(0, 1).cpu(), y.flatten(), reduction="sum").item()
        elapsed += time.perf_counter() - t0
        tokens += y.numel()
        targets_all.append(y.flatten())
    loss = nll / tokens
    bpb = None
    if tokenizer is not None and Path(tokenizer).exists():
        nbytes = byte_lengths(tokenizer, model.cfg.vocab_size)[torch.cat(targets_all)].sum().item()
        bpb = nll / math.log(2) / nbytes if nbytes else None
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb, "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed else None}


def size_on_disk(path: str | Path) -> int:
    """Bytes of every file in a MODEL directory (weights, config, tokenizer, checksums)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def nonzero_params(model: torch.nn.Module) -> int:
    """Unique parameters that are not exactly zero (what pruning removes)."""
    unique = {id(p): p for p in model.parameters()}.values()
    # torchao int8 weights are tensor subclasses without count_nonzero: count their codes
    return int(sum(torch.count_nonzero(getattr(p, "qdata", p).detach()).item() for p in unique))
