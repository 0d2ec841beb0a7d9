"""`kiln generate`: sample text from a MODEL, streamed as it is produced.

Greedy when temperature is 0; otherwise temperature, then top-k, then top-p
(nucleus) filtering, with an optional CTRL-style repetition penalty. A seeded
generator makes sampling reproducible. Plain GPT models decode with the model's
own KV cache (gpt.py; each step costs one token, not the whole context); other
models (e.g. a quantized one with its own loader) are re-run on the cropped
context each step. This file only samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import KilnError
from pipeline.device import autocast, default_device
from pipeline.model.gpt import GPT
from pipeline.model.layers import KVCache

# --------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[..., seen]
    logits[..., seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties at the threshold kept), set the rest to -inf."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p  # mass before this token already reaches p
    drop_sorted[..., 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token id from a (V,) logits vector."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


# --------------------------------------------------------------------------- decoding


def generate_ids(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 eos_id: int | Collection[int] | None = None, block_size: int | None = None,
                 use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time; stops after an `eos_id` (one id, or several: a chat model's end of
    turn and EOS) or after max_new_tokens."""
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    if not prompt:
        raise KilnError("the prompt encodes to zero tokens")
    block_size = block_size or model.cfg.block_size
    generator = torch.Generator().manual_seed(seed)  # sampling happens on CPU: same draws on any device
    dev = next(model.parameters()).device
    ids = list(prompt)
    cache = KVCache(len(model.blocks)) if use_cache and isinstance(model, GPT) else None
    fed = 0  # tokens of `ids` already in the cache
    model.eval()
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if cache is not None:
                if cache.pos + len(ids) - fed > block_size:  # full: restart from the last half window
                    cache, fed = KVCache(len(model.blocks)), len(ids) - block_size // 2
                with autocast(dev):
                    logits = model(torch.tensor([ids[fed:]], device=dev), cache=cache)[0][0, -1]
                fed = len(ids)
            else:
                with autocast(dev):
                    logits = model(torch.tensor([ids[-block_size:]], device=dev))[0][0, -1]
            logits = logits.float().cpu()
            logits = apply_repetition_penalty(logits, torch.tensor(sorted(set(ids))), repetition_penalty)
            token = next_token(logits, temperature, top_k, top_p, generator)
            yield token
            if token in stop:
                return
            ids.append(token)


# --------------------------------------------------------------------------- text in, text out


class StreamingDecoder:
    """Turn a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, sp, prompt: list[int]):
        self.sp, self.prompt, self.ids = sp, prompt, []
        self.base = sp.decode(prompt)
        self.emitted = ""

    def add(self, token: int, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        full = self.sp.decode(self.prompt + self.ids)
        text = full[len(self.base):] if full.startswith(self.base) else self.sp.decode(self.ids)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
             on_text: Callable[[str], None] | None = None, use_cache: bool = True,
             device: str | None = None, chat: bool = False) -> dict:
    """Generate from a MODEL dir (its tokenizer.model); `on_text` receives text as it is produced. With `chat`
    the prompt is one user turn of the chat format (pipeline/chat.py) and the reply ends at the end of turn."""
    import sentencepiece as spm

    from pipeline.model.io import TOKENIZER, load_model_dir

    model_dir = Path(model_dir)
    if not (model_dir / TOKENIZER).is_file():
        raise KilnError(f"{model_dir / TOKENIZER}: not found; generation needs the model's tokenizer")
    model, config = load_model_dir(model_dir, device=device or default_device())
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / TOKENIZER))
    if chat:
        from pipeline.chat import ChatTokenizer, problem

        messages = [{"role": "user", "content": prompt}]
        if reason := problem(messages, training=False):
            raise KilnError(f"--chat prompt refused: {reason}")
        talker = ChatTokenizer(sp, f"{model_dir / TOKENIZER}")
        prompt_ids, stops = talker.render(messages, add_generation_prompt=True).ids, talker.stop_ids
    else:
        prompt_ids = sp.encode(prompt)
        stops = [sp.eos_id()] if sp.eos_id() >= 0 else []
    block = int(config["model"]["block_size"])
    decoder = StreamingDecoder(sp, prompt_ids)
    t0 = time.perf_counter()
    out: list[int] = []
    for token in generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                              repetition_penalty, seed, stops, block, use_cache):
        out.append(token)
        if token in stops:
            break
        piece = decoder.add(token)
        if piece and on_text:
            on_text(piece)
    rest = decoder.add(None, final=True) if out else ""
    if rest and on_text:
        on_text(rest)
    elapsed = time.perf_counter() - t0
    return {"prompt": prompt, "text": decoder.emitted, "tokens": out, "new_tokens": len(out),
            "stopped_at_eos": bool(out) and out[-1] in stops, "seconds": elapsed, "chat": chat,
            "tokens_per_s": len(out) / elapsed if elapsed > 0 else None, "seed": seed,
            "temperature": temperature, "top_k": top_k, "top_p": top_p, "kv_cache": use_cache}
