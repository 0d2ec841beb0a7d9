"""bf16 weights with fp32 gradient sums: reduce-scatter them into each rank's partition, not all-reduce them.

At ZeRO-1 with several micro-batches a step, and under pipeline parallelism (DeepSpeed's pipe engine takes
ZeRO 0-1 only), bf16 training runs DeepSpeed's BF16_Optimizer: each micro-batch's bf16 gradients are added
into one fp32 buffer holding the rank's whole (TP/PP-local) model — Megatron's distributed optimizer keeps
the same unpartitioned fp32 buffer, 4 bytes a parameter, so that a step's micro-batches cost no
communication. At the step's end DeepSpeed all-reduces that whole buffer (in flattened copies of up to 500M
elements, 2 GB of fp32 each) although each rank's optimizer reads only its 1/dp partition of it.

`install` swaps that for what Megatron's distributed optimizer does: one reduce-scatter of the buffer in
place, so each rank receives only its own partition summed (half the bytes an all-reduce moves, and no
copy), and the step reads the partition alone — the global grad norm is summed from partitions (each
parameter counted once over TP and pipeline replicas), clipping scales the partition, and AdamW updates it
as before. DeepSpeed's after-step all-gather of the bf16 weights is unchanged.

    flat fp32 grads [N]   (each rank: its own sum over micro-batches, N = this TP/PP rank's parameters)
      -> reduce_scatter   part r of [N/dp] = mean over DP ranks of flat[r*N/dp : (r+1)*N/dp]
      -> norm**2 = sum over ranks (DP, then TP x PP) of |counted fragments of part|**2
      -> clip part, AdamW on part, all-gather bf16 weights (DeepSpeed)

Left to DeepSpeed (its all-reduce): expert parallelism and Muon, whose steps read whole gradients.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

# what BF16_Optimizer must have (DeepSpeed 0.19's names; constraints.txt pins it): else DeepSpeed's own path
NEEDED = ("fp32_groups_gradients_flat", "fp32_groups_gradient_flat_partition", "fp32_groups_gradients", "bf16_groups",
          "fp32_groups_flat_partition", "real_dp_process_group", "has_moe_layers", "mpu", "clip_grad",
          "clear_hp_grads", "clear_lp_grads", "update_lp_params", "_lazy_init_hp_params_optimizer_state")


def install(engine) -> bool:
    """Make `engine` (DeepSpeed's, plain or pipe) reduce-scatter its BF16_Optimizer's fp32 gradients and step on
    the partition. Returns whether it did (not for another optimizer, expert layers or Muon)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    opt = engine.optimizer
    if not isinstance(opt, BF16_Optimizer) or not all(hasattr(opt, a) for a in NEEDED):  # (another DeepSpeed)
        return False
    if opt.has_moe_layers or getattr(opt, "_uses_muon", False):
        return False
    if len({id(g) for g in opt.real_dp_process_group}) != 1:
        return False
    opt.kiln_counted = _counted_fragments(opt)
    opt.step = types.MethodType(_step, opt)
    fallback = engine.buffered_allreduce_fallback

    def reduce(grads=None, elements_per_buffer=None):
        if grads is not None:  # a caller's own tensors: DeepSpeed's way
            return fallback(grads=grads, elements_per_buffer=elements_per_buffer)
        _reduce_scatter(opt)

    engine.buffered_allreduce_fallback = reduce
    engine.kiln_reduce_scatter = True
    return True


def _counted_fragments(opt) -> list[torch.Tensor]:
    """The views of this rank's gradient partitions that the global norm counts: of each parameter, the part
    inside the partition, unless another rank counts that parameter (a TP-replicated one: TP rank 0 does; a
    tied embedding repeated on another pipeline stage: its first stage does)."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    tp_rank = bwc_tensor_model_parallel_rank(mpu=opt.mpu)
    out = []
    for flat, part, grads, params in zip(opt.fp32_groups_gradients_flat, opt.fp32_groups_gradient_flat_partition,
                                         opt.fp32_groups_gradients, opt.bf16_groups, strict=True):
        lo = part.storage_offset() - flat.storage_offset()
        hi = lo + part.numel()
        for grad, p in zip(grads, params, strict=True):
            if getattr(p, PIPE_REPLICATED, False) or not (tp_rank == 0 or is_model_parallel_parameter(p)):
                continue
            a = grad.storage_offset() - flat.storage_offset()
            start, stop = max(a, lo), min(a + grad.numel(), hi)
            if start < stop:
                out.append(part.narrow(0, start - lo, stop - start))
    return out


@torch.no_grad()
def _reduce_scatter(opt) -> None:
    """Each group's fp32 buffer, summed over data-parallel ranks into each rank's partition (in place), then
    averaged (DeepSpeed's all-reduce averages too). The rest of the buffer is left as it was, never read."""
    op = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # (its name before torch 2.13)
    for flat, part, group in zip(opt.fp32_groups_gradients_flat, opt.fp32_groups_gradient_flat_partition,
                                 opt.real_dp_process_group, strict=True):
        world = dist.get_world_size(group=group)
        if world > 1:
            op(part, flat, group=group)  # in place: part is this rank's slice of flat (as Megatron)
            part.mul_(1.0 / world)


@torch.no_grad()
def _step(self, closure=None) -> None:
    """BF16_Optimizer.step on the partition alone (bound to the optimizer by `install`)."""
    if closure is not None:
        raise NotImplementedError("closure")
    self.overflow = False
    device = self.fp32_groups_gradients_flat[0].device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for fragment in self.kiln_counted:
        sq += fragment.float().pow(2).sum()
    dist.all_reduce(sq, group=self.real_dp_process_group[0])
    if self.mpu is not None and dist.get_world_size(group=self.mpu.get_model_parallel_group()) > 1:
        dist.all_reduce(sq, group=self.mpu.get_model_parallel_group())
    norm = sq.sqrt()
    self._global_grad_norm = norm
    if not bool(torch.isfinite(norm)):  # (a host sync, as DeepSpeed's own check)
        self.overflow = True
        self._global_grad_norm = float("inf")
        self.clear_hp_grads()
        self.clear_lp_grads()
        return
    if self.clip_grad > 0:
        coef = (self.clip_grad / (norm + 1e-6)).clamp(max=1.0)  # DeepSpeed's clip_tensors_by_global_norm
        for part in self.fp32_groups_gradient_flat_partition:
            part.mul_(coef)
    for param, grad in zip(self.fp32_groups_flat_partition, self.fp32_groups_gradient_flat_partition, strict=True):
        param.grad = grad
    self.optimizer.step()
    self._lazy_init_hp_params_optimizer_state()
    self.update_lp_params()
    self.clear_hp_grads()
