"""Parameter and FLOP counts of a config, for `kiln plan` and MFU.

The counts come from the modules themselves, built on the meta device (no memory,
no init; milliseconds even at 70B), so a new model feature is counted without
touching this file. MFU uses 6*N + 12*n_layer*d*T FLOPs per token, where N counts
non-embedding parameters plus the output projection (a real matmul even when its
weight is tied to the embedding); the attention term depends on the query width d
only, grouped-query attention or not. In a mixture of experts a token runs only
experts_per_token of the n_experts experts (plus the router and any shared expert):
N counts those, the active parameters; "total" (memory) counts every expert.
"""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig


def param_counts(cfg: ModelConfig, vocab_size: int | None = None) -> dict[str, int]:
    """{"total", "embedding", "non_embedding", "active", "flop_params"} for a config; "active": what one token
    runs through (all but the experts it is not routed to)."""
    from pipeline.model.gpt import GPT
    from pipeline.model.layers import MoE

    v = vocab_size or cfg.vocab_size
    if v is None:
        raise ValueError("model.vocab_size is unknown: give it in the config or via the tokenizer")
    with torch.device("meta"):
        model = GPT(cfg.model_copy(update={"vocab_size": v}))
    total = model.num_params()
    non_embedding = model.num_params(non_embedding=True)
    output = model.head.lm_head.weight.numel()
    idle = sum(sum(p.numel() for p in m.experts.parameters()) * (len(m.experts) - m.k) // len(m.experts)
               for m in model.modules() if isinstance(m, MoE))
    return {
        "total": total,
        "embedding": total - non_embedding,
        "non_embedding": non_embedding,
        "active": total - idle,
        # the output matmul costs FLOPs whether or not its weight is tied
        "flop_params": non_embedding - idle + (output if cfg.tie_embeddings else 0),
    }


def flops_per_token(cfg: ModelConfig, vocab_size: int | None = None, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12*L*d*T."""
    t = seq_len or cfg.block_size
    n = param_counts(cfg, vocab_size)["flop_params"]
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.n_embd * t
