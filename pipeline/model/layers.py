"""The layers a model family is built from (pipeline/families/ names them by the keys of NORMS and MLPS).

Every layer derives its local sizes from its weights, never from the config, so a column-split projection
(tensor parallelism) simply yields fewer heads. A sub-block (attention, an MLP) declares its linear layers by
role, in the order they run: IN_PROJ read the sub-block's input, all fed by one `tp_input` (tensor
parallelism splits them by output features; GPTQ quantizes them from that shared input), and OUT_PROJ write
its output (split by input features; initialized at init_std / sqrt(2 n_layer), GPT-3's residual scaling).

Decoding passes a `KVCache`: each attention layer appends its new keys and values to it and attends over all
of them, so a generated token costs one position, not the whole context (the cache lives with the
attention, as in nanochat's engine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.families import family


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

    def forward(self, x: torch.Tensor, start: int | torch.Tensor = 0) -> torch.Tensor:
        """x: (B, H, T, D) at positions start.. (an int), or at the positions (B, T) given (packed rows)."""
        if isinstance(start, torch.Tensor):
            cos, sin = self.cos[start].unsqueeze(1).to(x.dtype), self.sin[start].unsqueeze(1).to(x.dtype)
        else:
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


class Packing:
    """Several documents packed in one row (supervised fine-tuning): `segments` (B, T) names the document of
    each position (padding -1). Each document's positions restart at 0 and it attends only to itself, causally,
    so it looks to the model as it would alone."""

    def __init__(self, segments: torch.Tensor):
        t = torch.arange(segments.size(-1), device=segments.device).expand_as(segments)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[..., 1:] = segments[..., 1:] != segments[..., :-1]
        self.positions = t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=-1).values  # (B, T)
        causal = torch.ones(t.size(-1), t.size(-1), dtype=torch.bool, device=segments.device).tril()
        # (B, 1, T, T): j <= i within one segment (a run of padding is a segment: no row is empty)
        self.mask = (causal & (segments.unsqueeze(-1) == segments.unsqueeze(-2))).unsqueeze(1)


class Attention(nn.Module):
    """Causal self-attention, grouped-query when n_kv_heads < n_head; rotary positions on q and k if the family
    uses them (within each document of a packed row: `Packing`). With model.qk_norm each head's queries and keys are RMS-normalized (one learned weight of
    head_dim each, shared by all heads) before rotary, as Qwen3 does: attention logits stay bounded.
    PER_HEAD names those norms: they act within a head, so tensor parallelism keeps them whole on every rank and
    sums their gradients over the group (each rank's heads contribute their part)."""

    IN_PROJ, OUT_PROJ, PER_HEAD = ("wq", "wk", "wv"), ("wo",), ("q_norm", "k_norm")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        spec = family(cfg)
        bias = spec.bias
        self.head_dim = cfg.head_dim
        kv = cfg.kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.wk = nn.Linear(cfg.n_embd, kv, bias=bias)
        self.wv = nn.Linear(cfg.n_embd, kv, bias=bias)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.rotary = Rotary(self.head_dim, cfg.block_size, cfg.rope_theta) if spec.positions == "rotary" else None
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.dropout
        self.tp_input = nn.Identity()  # tensor parallelism: the one input-gradient all-reduce for q, k and v

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None, packing: Packing | None = None) -> torch.Tensor:
        x = self.tp_input(x)  # (under sequence parallelism: the whole sequence gathered from 1/tp of it)
        b, t, _ = x.shape
        # -1: the number of (query or key/value) heads on this rank (all of them unless tensor-parallel)
        q, k, v = (w(x).view(b, t, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        start = cache.owner.pos if cache is not None else packing.positions if packing is not None else 0
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None:
            k, v = cache.extend(k, v)
        mask = packing.mask if packing is not None else None  # else causal; with a cache, also every cached token
        if cache is not None and start and t > 1:
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=k.size(1) != q.size(1))
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    IN_PROJ, OUT_PROJ = ("w1", "w3"), ("w2",)

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.mlp_width
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)  # down
        self.tp_input = nn.Identity()  # tensor parallelism: one input-gradient all-reduce for gate and up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp_input(x)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    IN_PROJ, OUT_PROJ = ("fc",), ("proj",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_width
        self.fc = nn.Linear(cfg.n_embd, hidden)
        self.proj = nn.Linear(hidden, cfg.n_embd)
        self.tp_input = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(self.tp_input(x)), approximate="tanh"))


class ReluSquaredMLP(nn.Module):
    """A non-gated MLP with ReLU² (model.mlp: relu2, as modded-nanogpt and Primer): down(relu(up(x))^2), with
    biases where the family has them; same roles and names as the GELU MLP."""

    IN_PROJ, OUT_PROJ = ("fc",), ("proj",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = family(cfg).bias
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=bias)
        self.proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=bias)
        self.tp_input = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(self.tp_input(x))).square())


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing as Mixtral does it: softmax over all experts (fp32), the k largest, renormalized to sum
    to 1. Returns (probs (N, E), gates (N, k), experts (N, k))."""
    probs = F.softmax(logits.float(), dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    return probs, gates / gates.sum(dim=-1, keepdim=True), experts


def balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss: E * sum_e (tokens routed to e per routing slot) x (mean prob of e),
    summed over the k slots (transformers' load_balancing_loss_func): k at a uniform router, more when skewed."""
    e = probs.size(-1)
    routed = F.one_hot(experts, e).float().mean(dim=0)  # (k, E): each slot's share of tokens per expert
    return e * (routed * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """Mixture of experts (Mixtral / Qwen-MoE): a router picks `experts_per_token` of `n_experts` SwiGLU experts
    per token, their outputs weighted by the renormalized gates; no capacity, no token is dropped. An optional
    shared expert sees every token. Each expert is its own sub-block (IN_PROJ / OUT_PROJ: tensor parallelism
    splits it like a dense MLP, GPTQ quantizes it from the tokens it receives); the router stays whole.
    `aux_loss` holds the last forward's load-balancing loss, which the model adds to the training loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg) for _ in range(cfg.n_experts))
        self.shared = SwiGLU(cfg, cfg.moe_shared_hidden) if cfg.moe_shared_hidden else None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        probs, gates, experts = route(self.router(flat), self.k)
        self.aux_loss = balance_loss(probs, experts)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):  # every expert runs (maybe on no token): TP ranks stay in step
            token, slot = torch.where(experts == e)
            out.index_add_(0, token, expert(flat[token]) * gates[token, slot, None].to(flat.dtype))
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)


NORMS = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}
MLPS = {"swiglu": SwiGLU, "gelu": GeluMLP, "moe": MoE, "relu2": ReluSquaredMLP}


def make_norm(cfg: ModelConfig) -> nn.Module:
    return NORMS[family(cfg).norm](cfg.n_embd, eps=cfg.norm_eps)


def make_mlp(cfg: ModelConfig) -> nn.Module:
    """The family's MLP, or the one model.mlp names in its place."""
    return MLPS[family(cfg).mlp if cfg.mlp == "family" else cfg.mlp](cfg)


def sub_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every sub-block under `module`: the modules that declare IN_PROJ / OUT_PROJ."""
    return [(n, m) for n, m in module.named_modules() if hasattr(m, "IN_PROJ")]


def linear_stages(block: nn.Module) -> list[list[str]]:
    """A block's linear layers in the order their inputs become final: each sub-block's IN_PROJ, then its
    OUT_PROJ (q/k/v, o, then the MLP's)."""
    return [[f"{name}.{n}" for n in names] for name, sub in sub_blocks(block) for names in (sub.IN_PROJ, sub.OUT_PROJ)]
