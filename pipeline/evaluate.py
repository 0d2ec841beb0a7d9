"""Perplexity, bits per byte and scored tokens/s of a model on a prepared split: `kiln eval` and the
before/after figures of quantize, distill, prune and the post-training report, one code path.

Windows: inputs tokens[begin:end], targets shifted by one; only targets not scored by an earlier
window count, so every token after the first is scored exactly once.
- stride = block_size / 2 (`evaluate`, `kiln eval`): each token has at least half a window of
  context, so the number does not depend on where fixed windows happen to cut.
- stride = block_size (`evaluate_windows`): non-overlapping windows, half the forward passes;
  a token sees on average only half a window of context, so perplexity reads a little higher
  (3.718 vs 3.698 on the test teacher). Good enough where models are compared on the same windows.
Bits per byte divide the summed NLL (in bits) by the UTF-8 size of the scored tokens decoded with
the sentencepiece tokenizer, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import KilnError
from pipeline.console import progress
from pipeline.data.corpus import PreparedCorpus, TokenStream
from pipeline.device import autocast, default_device, describe, use_cpu_threads

SPEED_SETUP = ("device", "threads", "batch_size")  # what a tokens/s figure depends on besides the model


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first): inputs tokens[begin:end], targets tokens[begin+1:end+1], of which only
    targets[first:] are new. Together the windows score tokens 1..n_tokens-1 exactly once."""
    if stride < 1 or stride > block_size:
        raise ValueError(f"stride {stride} must be in [1, block_size {block_size}]")
    out, scored, begin = [], 0, 0
    while scored < n_tokens - 1:
        end = min(begin + block_size, n_tokens - 1)
        out.append((begin, end, scored - begin))
        scored, begin = end, begin + stride
    return out


def _batches(stream: TokenStream, wins: list[tuple[int, int, int]], batch_size: int):
    """(x, y) of up to batch_size windows of one length (only the last window can be shorter);
    targets already scored by an earlier window are set to -100 (ignored)."""
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        for length in dict.fromkeys(e - b for b, e, _ in group):
            same = [w for w in group if w[1] - w[0] == length]
            x = torch.stack([torch.from_numpy(stream.read(b, e - b)) for b, e, _ in same])
            y = torch.stack([torch.from_numpy(stream.read(b + 1, e - b)) for b, e, _ in same])
            for row, (_, _, first) in enumerate(same):
                y[row, :first] = -100
            yield x, y


@torch.inference_mode()
def score_stream(model: torch.nn.Module, stream: TokenStream, block_size: int, max_tokens: int | None = None,
                 stride: int | None = None, batch_size: int = 8, device: str | None = None,
                 show: bool = True) -> dict:
    """Summed NLL (nats) and count of the scored tokens, plus the seconds spent in forward + loss.

    One untimed warm-up forward first: the first call pays one-time costs (allocator, kernels,
    torchao dispatch), not the model. The loss is read back inside the timed region, so on a GPU
    the time includes the kernels, not just their launch."""
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens + 1)
    if n < 2:
        raise KilnError(f"evaluation stream has {n} tokens; need at least 2")
    stride = stride or max(1, block_size // 2)
    device = device or next(model.parameters()).device
    wins = sliding_windows(n, block_size, stride)
    model.eval()
    with autocast(device):
        model(next(_batches(stream, wins, batch_size))[0].to(device))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # the warm-up's kernels must not be timed with the first batch
    nll, count, forward_s = 0.0, 0, 0.0
    with progress("eval", total=n - 1, unit="tok", disable=None if show else True) as advance:
        for x, y in _batches(stream, wins, batch_size):
            x, y = x.to(device), y.to(device)
            t0 = time.perf_counter()
            with autocast(device):
                logits, _ = model(x)
            loss = float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                         reduction="sum"))
            forward_s += time.perf_counter() - t0
            new = int((y != -100).sum())
            nll, count = nll + loss, count + new
            advance(new)
    return {"nll": nll, "tokens": count, "forward_s": forward_s, "stride": stride, "n_tokens": n}


def count_bytes(ids: np.ndarray, tokenizer_path: str | Path) -> int:
    """UTF-8 bytes of the text `ids` stand for, decoded document by document (split at EOS).

    Decoding, not a per-piece byte table: sentencepiece drops the leading "▁" of each document and
    joins byte-fallback pieces into characters, so only the decoded text has the true size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    eos, vocab = sp.eos_id(), sp.get_piece_size()
    total = 0
    for doc in np.split(ids, np.flatnonzero(ids == eos)):  # each piece after the first starts with an EOS
        doc = doc[(doc >= 0) & (doc < vocab) & (doc != eos)]
        total += len(sp.decode(doc.tolist()).encode("utf-8"))
    return total


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Summed NLL in nats over the UTF-8 bytes those tokens stand for, in bits: the size of the text under
    the model, which does not depend on how a tokenizer cut it (`kiln eval` and training's val_bpb)."""
    return nll / math.log(2) / n_bytes


def evaluate(model: torch.nn.Module, data_dir: str | Path, split: str = "val", max_tokens: int | None = None,
             block_size: int | None = None, stride: int | None = None, tokenizer: str | Path | None = None,
             batch_size: int = 8, device: str | None = None, show: bool = True) -> dict:
    """Loss, perplexity, bits/token, bits/byte and scored tokens/s over the first `max_tokens`
    targets of `split` (all when None). Bits/byte use `tokenizer`, else the corpus's; None without
    one. `device`: the model's by default."""
    corpus = PreparedCorpus(data_dir)
    stream = corpus.stream(split)
    block_size = block_size or model.cfg.block_size
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and corpus.vocab_size > vocab:
        raise KilnError(f"{corpus.dir / 'manifest.json'}: corpus vocab {corpus.vocab_size} is larger than the "
                        f"model's vocab_size {vocab}; wrong tokenizer for this model?")
    t0 = time.perf_counter()
    res = score_stream(model, stream, block_size, max_tokens, stride=stride, batch_size=batch_size, device=device,
                       show=show)
    wall = time.perf_counter() - t0
    tok_path = Path(tokenizer) if tokenizer else corpus.tokenizer_path
    n_bytes = count_bytes(stream.read(1, res["tokens"]), tok_path) if tok_path.is_file() else None
    mean = res["nll"] / res["tokens"]
    return {
        "split": split,
        "tokens": res["tokens"],
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "bytes": n_bytes,
        "bits_per_byte": bits_per_byte(res["nll"], n_bytes) if n_bytes else None,
        "tokens_per_s": res["tokens"] / res["forward_s"] if res["forward_s"] > 0 else None,
        # how tokens_per_s was measured: speeds compare only where these agree (`kiln eval --compare`)
        "device": describe(device or next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "wall_s": wall,
        "block_size": block_size,
        "stride": res["stride"],
        "data_digest": corpus.digest,
    }


def evaluate_windows(model: torch.nn.Module, data_dir: str | Path, max_windows: int | None, split: str = "val",
                     **kw) -> dict:
    """`evaluate` over the first `max_windows` non-overlapping windows (all when None), no progress bar:
    the quick before/after figure of the post-training stages (their `eval_windows` key)."""
    block = kw.pop("block_size", None) or model.cfg.block_size
    max_tokens = None if max_windows is None else max_windows * block
    return evaluate(model, data_dir, split, max_tokens, block_size=block, stride=block, show=False, **kw)


def evaluate_model(model: str | Path, data_dir: str | Path, split: str = "val", max_tokens: int | None = None,
                   tracker=None, device: str | None = None) -> dict:
    """`kiln eval`: MODEL dir or models:/ URI (fetched into the cache first); logs when tracking is on."""
    from pipeline.model.io import load_model_dir

    device = device or default_device()
    if torch.device(device).type == "cpu":
        use_cpu_threads()
    local = tracker.materialize(model) if tracker is not None else Path(model)
    net, config = load_model_dir(local, device=device)
    block = int(config.get("model", {}).get("block_size") or net.cfg.block_size)
    result = evaluate(net, data_dir, split, max_tokens, block_size=block, device=device)
    result["model"] = str(model)
    if tracker is not None and tracker.enabled:
        numeric = {k: v for k, v in result.items() if k in ("loss", "perplexity", "bits_per_token",
                                                            "bits_per_byte", "tokens", "tokens_per_s")
                   and v is not None}
        setup = {k: result[k] for k in SPEED_SETUP}
        result["tracking"] = tracker.attach_eval(model if str(model).startswith("models:/") else local,
                                                 numeric, split, data_dir, setup)
    return result
