"""Parameter and FLOP counts from the config alone (no torch), for `kiln plan` and MFU.

MFU uses the design's formula: 6*N + 12*n_layer*d*T FLOPs per token, where N
counts non-embedding parameters plus the output projection (which is a real
matmul even when its weight is tied to the embedding).
"""

from __future__ import annotations

import math

from pipeline.config import ModelConfig


def ffn_hidden(cfg: ModelConfig) -> int:
    """MLP width: 4d for GPT-2; for SwiGLU 8d/3 (same FLOPs as 4d GELU), rounded up to 64."""
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    if cfg.style == "gpt2":
        return 4 * cfg.n_embd
    return 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


def layer_params(cfg: ModelConfig) -> int:
    d, f = cfg.n_embd, ffn_hidden(cfg)
    if cfg.style == "gpt2":  # biases everywhere, two LayerNorms with weight+bias
        return (4 * d * d + 4 * d) + (2 * d * f + f + d) + 4 * d
    return 4 * d * d + 3 * d * f + 2 * d  # no biases, two RMSNorm weights


def param_counts(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
    """{"total", "embedding", "non_embedding", "flop_params"} for a config."""
    v = vocab_size or cfg.vocab_size
    if v is None:
        raise ValueError("model.vocab_size is unknown: give it in the config or via the tokenizer")
    d = cfg.n_embd
    final_norm = 2 * d if cfg.style == "gpt2" else d
    embedding = v * d + (cfg.block_size * d if cfg.style == "gpt2" else 0)
    head = 0 if cfg.tie_embeddings else v * d
    non_embedding = cfg.n_layer * layer_params(cfg) + final_norm + head
    return {
        "total": embedding + non_embedding,
        "embedding": embedding,
        "non_embedding": non_embedding,
        # the output matmul costs FLOPs whether or not its weight is tied
        "flop_params": non_embedding + (v * d if cfg.tie_embeddings else 0),
    }


def flops_per_token(cfg: ModelConfig, vocab_size: int | None = None, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12*L*d*T."""
    t = seq_len or cfg.block_size
    n = param_counts(cfg, vocab_size)["flop_params"]
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * t
