"""A plain GPT decoder, readable top to bottom (after nanoGPT).

Two styles from one config: `llama` (RMSNorm, rotary positions, SwiGLU, no biases)
and `gpt2` (LayerNorm, learned positions, GELU, biases). The model knows nothing
about ranks or devices: tensor and pipeline parallelism are applied on top of it
by `pipeline/model/tensor_parallel.py` and `pipeline/parallel/`. For that, every
layer derives its local sizes from its weights, never from the config, so a
column-split projection simply yields fewer heads.

The model can be built on the meta device (no memory, no init) and materialized
later, shard by shard: `init_plan` says how each parameter starts, and buffers
are recomputed by `reset_buffers()`.

Attention is grouped-query when model.n_kv_heads < n_head (each key/value head
serves n_head / n_kv_heads query heads). Decoding passes a `KVCache`: each
attention layer appends its new keys and values to it and attends over all of
them, so a generated token costs one position, not the whole context (the
cache lives with the attention, as in nanochat's engine).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.style == "gpt2":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)


class Rotary(nn.Module):
    """Rotary position embedding, "rotate half" layout (same as HF Llama, so exports need no permutation)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute cos/sin on the buffers' device (a no-op on the meta device)."""
        if self.cos.is_meta:
            return
        d = self.head_dim
        inv_freq = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.cos.device) / d)
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32, device=self.cos.device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        with torch.no_grad():
            self.cos.copy_(emb.cos())
            self.sin.copy_(emb.sin())

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # x: (B, H, T, D) at positions start..
        t = x.size(-2)
        cos, sin = self.cos[start:start + t].to(x.dtype), self.sin[start:start + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for the tokens decoded so far (`pos` of them)."""

    def __init__(self, n_layer: int):
        self.pos = 0
        self.layers = [LayerKV(self) for _ in range(n_layer)]


class LayerKV:
    """One layer's slot in a KVCache."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions (B, H_kv, t, D); return keys and values of every position so far."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.style == "gpt2"
        self.head_dim = cfg.head_dim
        kv = cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.wk = nn.Linear(cfg.n_embd, kv, bias=bias)
        self.wv = nn.Linear(cfg.n_embd, kv, bias=bias)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.rotary = Rotary(self.head_dim, cfg.block_size, cfg.rope_theta) if cfg.style == "llama" else None
        self.dropout = cfg.dropout
        self.tp_input = nn.Identity()  # tensor parallelism: the one input-gradient all-reduce for q, k and v

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        x = self.tp_input(x)  # (under sequence parallelism: the whole sequence gathered from 1/tp of it)
        b, t, _ = x.shape
        # -1: the number of (query or key/value) heads on this rank (all of them unless tensor-parallel)
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        start = cache.owner.pos if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.extend(k, v)
        mask = None  # causal among the new tokens; each also sees every cached one
        if start and t > 1:
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=k.size(1) != q.size(1))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_width
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)  # down
        self.tp_input = nn.Identity()  # tensor parallelism: one input-gradient all-reduce for gate and up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp_input(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_width
        self.fc = nn.Linear(cfg.n_embd, hidden)
        self.proj = nn.Linear(hidden, cfg.n_embd)
        self.tp_input = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(self.tp_input(x)), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.style == "llama" else GeluMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class Embedding(nn.Module):
    """Token embedding (+ learned positions for gpt2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.style == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.tp_output = nn.Identity()  # sequence parallelism: this rank's 1/tp of the sequence

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device))
        return self.tp_output(self.drop(x))


class Head(nn.Module):
    """Final norm and the output projection to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = make_norm(cfg)
        self.tp_input = nn.Identity()  # tensor parallelism: the input of the vocabulary-split lm_head
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states, what lm_head projects (training takes the loss from them)."""
        return self.tp_input(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(x))


# A block's linear layers by role, in the order they run (llama and gpt2 MLP names): each sub-block reads its
# input through IN_PROJ, all fed by one `tp_input` (tensor parallelism splits them by output features; GPTQ
# quantizes them from that shared input), and writes its output through OUT_PROJ (split by input features).
IN_PROJ = {"attn": ("wq", "wk", "wv"), "mlp": ("w1", "w3", "fc")}
OUT_PROJ = {"attn": ("wo",), "mlp": ("w2", "proj")}
LINEAR_STAGES = [tuple(f"{sub}.{n}" for n in names[sub]) for sub in IN_PROJ for names in (IN_PROJ, OUT_PROJ)]
RESIDUAL = tuple(f"{sub}.{n}" for sub, names in OUT_PROJ.items() for n in names)  # GPT-3: std / sqrt(2 n_layer)


def init_plan(module: nn.Module, cfg: ModelConfig, skip: tuple[str, ...] = ()) -> list[tuple[str, str, float]]:
    """How every parameter under `module` starts, in a fixed order: (name, "normal" | "zeros" | "ones", std).

    GPT-3 style: linear weights and embeddings N(0, init_std), residual output projections
    N(0, init_std / sqrt(2 n_layer)), biases 0, norm weights 1. The order is the order in which a
    seeded generator draws them, so a part initialized alone equals the same part of the whole model.
    `skip` names submodules left out (a tied head: the embedding carries its weight).
    """
    plan = []
    for name, m in module.named_modules():
        if name in skip:
            continue
        pre = f"{name}." if name else ""
        if isinstance(m, nn.Linear | nn.Embedding):
            residual = isinstance(m, nn.Linear) and name.endswith(RESIDUAL)
            plan.append((pre + "weight", "normal", cfg.init_std / math.sqrt(2 * cfg.n_layer) if residual else cfg.init_std))
            if getattr(m, "bias", None) is not None:
                plan.append((pre + "bias", "zeros", 0.0))
        elif isinstance(m, nn.LayerNorm | nn.RMSNorm):
            plan.append((pre + "weight", "ones", 0.0))
            if getattr(m, "bias", None) is not None:
                plan.append((pre + "bias", "zeros", 0.0))
    return plan


def initial_value(kind: str, std: float, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """One parameter's starting value (fp32, CPU) as `init_plan` describes it."""
    if kind == "normal":
        return torch.randn(shape, generator=generator) * std
    return torch.ones(shape) if kind == "ones" else torch.zeros(shape)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token loss in fp32; target -100 is ignored."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set before building the model")
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = Head(cfg)
        if cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.wte.weight
        self.loss_fn = cross_entropy  # tensor parallelism swaps in a vocab-parallel version
        # training (parallelize.py) sets a ChunkedCrossEntropy: the loss comes from the final hidden states
        # a chunk of tokens at a time, and the full logits are never built
        self.hidden_loss = None
        if not self.embed.wte.weight.is_meta:  # built for use right away (not to be materialized by parts)
            params = dict(self.named_parameters())
            with torch.no_grad():
                for name, kind, std in init_plan(self, cfg, skip=("head.lm_head",) if cfg.tie_embeddings else ()):
                    params[name].copy_(initial_value(kind, std, params[name].shape))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Return logits (B, T, V), and the mean loss when targets are given (then logits are None if the
        loss is chunked: `hidden_loss`). With a cache, `idx` are the tokens after the cached ones, and
        their keys/values join the cache."""
        start = cache.pos if cache is not None else 0
        if start + idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence length {start + idx.size(1)} exceeds model.block_size {self.cfg.block_size}")
        x = self.embed(idx, start)
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache.layers[i])
        if cache is not None:
            cache.pos += idx.size(1)
        if targets is not None and self.hidden_loss is not None:
            return None, self.hidden_loss(self.head.hidden(x), self.head.lm_head.weight, targets)
        logits = self.head(x)
        if targets is None:
            return logits, None
        return logits, self.loss_fn(logits, targets)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); non_embedding drops wte/wpe."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding:
            n -= self.embed.wte.weight.numel()
            if self.embed.wpe is not None:
                n -= self.embed.wpe.weight.numel()
        return n
