"""`kiln eval`: perplexity and bits per byte of a MODEL on a prepared split.

Sliding window (stride = block_size / 2): every token after the first is scored
exactly once, with at least half a window of context, so the number does not
depend on where fixed windows happen to cut. Bits per byte divides the total
negative log-likelihood (in bits) by the UTF-8 size of the scored text, which
makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import KilnError
from pipeline.console import progress
from pipeline.data.corpus import PreparedCorpus, TokenStream


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


@torch.inference_mode()
def score_stream(model: torch.nn.Module, stream: TokenStream, block_size: int, max_tokens: int | None = None,
                 stride: int | None = None, batch_size: int = 8, device: str = "cpu", show: bool = True) -> dict:
    """Total NLL (nats) and count of the scored tokens, plus forward throughput."""
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens + 1)
    if n < 2:
        raise KilnError(f"evaluation stream has {n} tokens; need at least 2")
    stride = stride or max(1, block_size // 2)
    wins = sliding_windows(n, block_size, stride)
    model.eval()
    nll, count, forward_s = 0.0, 0, 0.0
    with progress("eval", total=n - 1, unit="tok", disable=None if show else True) as advance:
        for i in range(0, len(wins), batch_size):
            group = wins[i:i + batch_size]
            # windows in a batch share a length except possibly the very last one: split it off
            for batch in _same_length(group):
                x = torch.stack([torch.from_numpy(stream.read(b, e - b)) for b, e, _ in batch]).to(device)
                y = torch.stack([torch.from_numpy(stream.read(b + 1, e - b)) for b, e, _ in batch]).to(device)
                for row, (_, _, first) in enumerate(batch):
                    y[row, :first] = -100
                t0 = time.perf_counter()
                logits, _ = model(x)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                       ignore_index=-100, reduction="sum")
                forward_s += time.perf_counter() - t0
                new = int((y != -100).sum())
                nll, count = nll + float(loss), count + new
                advance(new)
    return {"nll": nll, "tokens": count, "forward_s": forward_s, "stride": stride, "n_tokens": n}


def _same_length(group: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    out: list[list] = []
    for w in group:
        if out and (out[-1][0][1] - out[-1][0][0]) == (w[1] - w[0]):
            out[-1].append(w)
        else:
            out.append([w])
    return out


def count_bytes(stream: TokenStream, start: int, length: int, tokenizer_path: Path) -> int:
    """UTF-8 bytes of tokens[start:start+length], decoded document by document (split at EOS)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    ids = stream.read(start, length)
    eos, vocab = sp.eos_id(), sp.get_piece_size()
    total, doc = 0, []
    for chunk_start in range(0, len(ids), 1 << 16):
        for t in ids[chunk_start:chunk_start + (1 << 16)].tolist():
            if t == eos:
                total += len(sp.decode(doc).encode("utf-8"))
                doc = []
            elif 0 <= t < vocab:
                doc.append(t)
    return total + len(sp.decode(doc).encode("utf-8"))


def evaluate(model: torch.nn.Module, data_dir: str | Path, split: str = "val", max_tokens: int | None = None,
             block_size: int | None = None, tokenizer: str | Path | None = None, batch_size: int = 8,
             device: str = "cpu", show: bool = True) -> dict:
    """Perplexity, bits/token, bits/byte (None without a tokenizer) and eval tokens/s."""
    corpus = PreparedCorpus(data_dir)
    stream = corpus.stream(split)
    block_size = block_size or model.cfg.block_size
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and corpus.vocab_size > vocab:
        raise KilnError(f"{corpus.dir / 'manifest.json'}: corpus vocab {corpus.vocab_size} is larger than the "
                        f"model's vocab_size {vocab}; wrong tokenizer for this model?")
    t0 = time.perf_counter()
    res = score_stream(model, stream, block_size, max_tokens, batch_size=batch_size, device=device, show=show)
    wall = time.perf_counter() - t0
    tok_path = Path(tokenizer) if tokenizer else corpus.tokenizer_path
    n_bytes = count_bytes(stream, 1, res["tokens"], tok_path) if tok_path.is_file() else None
    mean = res["nll"] / res["tokens"]
    return {
        "split": split,
        "tokens": res["tokens"],
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "bytes": n_bytes,
        "bits_per_byte": res["nll"] / math.log(2) / n_bytes if n_bytes else None,
        "tokens_per_s": res["tokens"] / res["forward_s"] if res["forward_s"] > 0 else None,
        "wall_s": wall,
        "block_size": block_size,
        "stride": res["stride"],
        "data_digest": corpus.digest,
    }


def evaluate_model(model: str | Path, data_dir: str | Path, split: str = "val", max_tokens: int | None = None,
                   tracker=None, device: str | None = None) -> dict:
    """`kiln eval`: MODEL dir or models:/ URI (fetched into the cache first); logs when tracking is on."""
    from pipeline.model.io import load_model_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local = tracker.materialize(model) if tracker is not None else Path(model)
    net, config = load_model_dir(local, device=device)
    block = int(config.get("model", {}).get("block_size") or net.cfg.block_size)
    result = evaluate(net, data_dir, split, max_tokens, block_size=block, device=device)
    result["model"] = str(model)
    if tracker is not None and tracker.enabled:
        numeric = {k: v for k, v in result.items() if k in ("loss", "perplexity", "bits_per_token",
                                                            "bits_per_byte", "tokens", "tokens_per_s")
                   and v is not None}
        result["tracking"] = tracker.attach_eval(model if str(model).startswith("models:/") else local,
                                                 numeric, split, data_dir)
    return result
