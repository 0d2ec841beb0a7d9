"""The optimizer a training run steps: `train.optimizer: adamw | muon`.

AdamW (decoupled weight decay on matrices and embeddings, none on norms and biases) is the default.

Muon (Keller Jordan, 2024) updates each *hidden matrix* — every 2-D weight inside a transformer block
except a mixture of experts' router — with its Nesterov momentum orthogonalized by five quintic
Newton–Schulz iterations and scaled by sqrt(max(1, rows/cols)), at its own learning rate
(`train.muon_lr`). Embeddings, the output head, norms and biases keep AdamW at `train.lr`. The schedule
scales both rates by the same factor each step (`set_lr`). Newton–Schulz runs in bf16 where the device
multiplies bf16 natively (`train.muon_ns_precision: auto`; at the baby-GPT shape on a 2-core AVX512-BF16 CPU
Muon's step takes 0.33 s instead of 0.50 s in fp32), its result ~3% from fp32's.

Where the two run:
- ZeRO stage 0: Kiln's `Muon` below, a torch AdamW whose hidden-matrix groups are stepped by Muon first.
  A tensor-parallel matrix is split over the TP group, and Newton–Schulz of a slice is not the slice of
  Newton–Schulz of the matrix: each TP rank all-gathers the (momentum-blended) update along the split
  dimension, orthogonalizes the whole matrix (every TP rank the same, redundantly: it is a few small
  matmuls per matrix) and keeps its own slice. The momentum itself stays sliced (it is element-wise).
  So TP, PP and DP at stage 0 take the update one process would take (tests/test_train_layouts.py).
- ZeRO stages 1 and 2: ZeRO hands an optimizer flat partitions, not matrices, so there DeepSpeed's own
  Muon runs inside ZeRO's partitioning (it gathers each matrix over data-parallel ranks). It orthogonalizes
  the matrix a rank holds, so with tp > 1 it would orthogonalize each TP slice alone: Kiln refuses Muon with
  tp > 1 above stage 0 (RunConfig), as it refuses stage 3, CPU offload and mixtures of experts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.config import RunConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, steepest at zero (Jordan et al.)
NS_STEPS = 5


def hidden_matrices(model: torch.nn.Module) -> set[int]:
    """ids of the parameters Muon updates: the 2-D weights of the transformer blocks (not a router)."""
    from pipeline.model.gpt import Block

    ids = set()
    for module in model.modules():
        if isinstance(module, Block):
            for name, p in module.named_parameters():
                if p.requires_grad and p.ndim == 2 and "router" not in name.split("."):
                    ids.add(id(p))
    return ids


def param_groups(model: torch.nn.Module, weight_decay: float, muon: set[int] | None = None,
                 muon_weight_decay: float = 0.0) -> list[dict]:
    """Decay matrices (weights, embeddings), not norms or biases; `muon` ids in a group of their own. A ZeRO-3
    parameter is judged by its full shape (`ds_shape`): its own data is an empty placeholder once partitioned."""
    muon = muon or set()
    hidden, decay, no_decay = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in muon:
                hidden.append(p)
            else:
                (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    if muon:
        groups.insert(0, {"name": "hidden", "params": hidden, "weight_decay": muon_weight_decay, "muon": True})
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if any(is_moe_param(p) for p in decay):  # expert parallelism: experts reduce over their own group
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (a GPU; a CPU with AVX512-BF16 or AMX), where they
    take about half the time fp32 ones do."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors (U V^T, singular values ~ 0.7-1.2).
    In bf16 where the device multiplies it natively (the iteration is robust to it: modded-nanogpt's choice),
    fp32 elsewhere; `dtype` forces one."""
    a, b, c = NS_COEFFICIENTS
    dtype = dtype or (torch.bfloat16 if native_bf16(g.device) else torch.float32)
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1
    n, m = x.shape
    if x.dtype == torch.float32 and m > 2 * n:
        return (_gram_newton_schulz(x, steps).mT if tall else _gram_newton_schulz(x, steps)).to(g.dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def _gram_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration for a wide x (n x m, m > 2n) carried out on n x n matrices: each step multiplies x on
    the left by q = aI + bR + cR² with R = x x^T, and every such q (and R) is a polynomial in the first R, so
    they commute: R_next = q R q^T = q² R. The product of the q's is applied to x once at the end: 4n³ a step
    instead of 4n²m + 2n³ (an MLP matrix 4x as wide as deep: 40% fewer FLOPs over 5 steps; the first step's
    product and the last step's R are not needed). fp32 only: in half precision the accumulated product
    drifts (DeepSpeed restarts it for fp16)."""
    a, b, c = NS_COEFFICIENTS
    r = x @ x.mT
    eye = torch.eye(r.size(0), dtype=r.dtype, device=r.device)
    prod = None
    for i in range(steps):
        q = a * eye + b * r + c * (r @ r)
        prod = q if prod is None else q @ prod
        if i + 1 < steps:
            r = q @ (q @ r)
    return prod @ x


def orthogonalized(update: torch.Tensor, param: torch.Tensor, tp_group, dtype: torch.dtype | None = None
                   ) -> torch.Tensor:
    """Muon's step direction for `param` from its blended update; a TP slice is orthogonalized as the whole
    matrix it belongs to (all-gathered over `tp_group`), and this rank's slice returned."""
    shard = getattr(param, "tp_shard", None)
    if shard is None or shard.size == 1:
        full = update
    else:
        parts = [torch.empty_like(update) for _ in range(shard.size)]
        dist.all_gather(parts, update.contiguous(), group=tp_group)
        full = torch.cat(parts, dim=shard.dim)
    rows, cols = full.shape
    out = newton_schulz(full, dtype=dtype) * math.sqrt(max(1.0, rows / cols))
    if full is not update:
        out = out.narrow(shard.dim, shard.start, shard.stop - shard.start)
    return out


class Muon(torch.optim.AdamW):
    """AdamW for every group, except that groups marked `muon` are stepped by Muon (see the module docstring).
    One torch optimizer, so DeepSpeed checkpoints, restores and steps it like AdamW; Muon's momentum is each
    hidden matrix's `momentum_buffer` state."""

    def __init__(self, groups: list[dict], *, tp_group=None, momentum: float = 0.95,
                 ns_dtype: torch.dtype | None = None, **adamw):
        for g in groups:
            if g.get("muon"):
                g.setdefault("momentum", momentum)
        super().__init__(groups, **adamw)
        self.tp_group, self.ns_dtype = tp_group, ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        held = []
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            beta = group["momentum"]
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)  # TP ranks gather in step
                state = self.state[p]
                if "momentum_buffer" not in state:  # (a "step" too: AdamW's load_state_dict expects one in every state)
                    state["momentum_buffer"], state["step"] = torch.zeros_like(p), torch.zeros((), dtype=torch.float32)
                state["step"] += 1
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - beta)
                update = orthogonalized(grad.lerp(buf, beta), p, self.tp_group, self.ns_dtype)  # Nesterov
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                if p.grad is not None:  # AdamW's step below skips parameters without a gradient
                    held.append((p, p.grad))
                    p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, grad in held:
                p.grad = grad


def build(cfg: RunConfig, model: torch.nn.Module, layout, device: torch.device, ds_config: dict):
    """(the optimizer to hand deepspeed.initialize, or None with `ds_config` given DeepSpeed's own Muon, and
    the model_parameters DeepSpeed then builds it from)."""
    t = cfg.train
    # Fused AdamW (one kernel, no temporaries) wherever ZeRO hands the optimizer one flat partition, and on GPUs.
    # On CPU at stage 0 it sees each weight as its own tensor: torch's per-tensor loop is faster there (its
    # temporaries are one tensor's size), as torch itself chooses on CPU.
    fused = device.type != "cpu" or cfg.parallel.zero_stage >= 1
    adamw = {"lr": t.lr, "betas": (t.beta1, t.beta2), "eps": 1e-8, "fused": fused, "foreach": None if fused else False}
    if t.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, t.weight_decay), **adamw), None
    hidden = hidden_matrices(model)
    groups = param_groups(model, t.weight_decay, hidden, t.muon_weight_decay)
    for g in groups:
        g["lr"] = t.muon_lr if g.get("muon") else t.lr
    if cfg.parallel.zero_stage == 0:
        ns_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[t.muon_ns_precision]
        return Muon(groups, tp_group=layout.tp_group if layout.tp > 1 else None, momentum=t.muon_momentum,
                    ns_dtype=ns_dtype, **adamw), None
    for p in model.parameters():
        p.use_muon = id(p) in hidden
    for g in groups:
        g.pop("muon", None)
    ds_config["optimizer"] = {"type": "Muon", "params": {
        "lr": t.lr, "muon_lr": t.muon_lr, "adam_lr": t.lr, "momentum": t.muon_momentum,
        "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay}}
    return None, groups
