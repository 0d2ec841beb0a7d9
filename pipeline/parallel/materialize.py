"""Weights that do not depend on the layout, made only where they live, and written back the same way.

A model is built on the meta device (nothing allocated), parallelized there, then materialized:
each rank allocates and fills only its own slice of each parameter. The values come from

    a seed     each rank draws only its own slice of each parameter, on its device, from generators seeded
               by (train.seed, the parameter's name, a block of it) (pipeline/model/init.py): a pipeline stage
               that holds blocks 3..5, a TP rank that holds half of each matrix, a ZeRO-3 rank that holds
               1/dp of it all get exactly the weights of the 1-process model;
    weights    a checkpoint or MODEL dir (`train.init_from`, a resume at another layout), read tensor by tensor,
               and of each tensor only the rows this rank's TP slice holds (`Weights.rows`: safetensors
               slices; of a checkpoint's per-rank files, only those holding those rows).

No full tensor is ever made (a TP-whole parameter aside), so init memory is the rank's share plus one
parameter's slice. Under ZeRO-3 each parameter is handed to DeepSpeed's partitioner as soon as it is
filled: from the seed, each data-parallel rank draws just the rows its 1/dp partition covers (nothing is
broadcast); from weights, data-parallel rank 0 reads the slice and DeepSpeed broadcasts it.

`local_slices` is the way back: the slices this rank holds, named by the plain model, for its weight shard
in a checkpoint (pipeline/model/weights.py reassembles them).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import KilnError, ModelConfig
from pipeline.model.gpt import GPT, init_plan
from pipeline.model.init import initial_slice
from pipeline.model.weights import Weights


def mark_part(module: nn.Module, index: int, prefix: str, cfg: ModelConfig) -> nn.Module:
    """Tag a plain part (before any parallelism) with its index, plain-name prefix and init plan."""
    skip = ("lm_head",) if cfg.tie_embeddings and prefix == "head." else ()  # the embedding carries it
    module.kiln_part = (index, prefix, [(n, k, s, tuple(_param(module, n).shape)) for n, k, s in init_plan(module, cfg, skip)])
    return module


def mark_parts(model: GPT) -> GPT:
    mark_part(model.embed, 0, "embed.", model.cfg)
    for i, block in enumerate(model.blocks):
        mark_part(block, i + 1, f"blocks.{i}.", model.cfg)
    mark_part(model.head, model.cfg.n_layer + 1, "head.", model.cfg)
    return model


def parts(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if hasattr(m, "kiln_part")]


def _param(module: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter a plain-model name stands for under `module`; None where this rank holds none of it (an
    expert on another expert-parallel rank: a swapped layer maps the plain names it keeps in `plain_names`)."""
    if name.startswith(getattr(module, "renamed", ())):
        real = module.plain_names.get(name)
        return None if real is None else module.get_parameter(real)
    head, _, rest = name.partition(".")
    return _param(module.get_submodule(head), rest) if rest else module._parameters[head]


def _allocate(module: nn.Module, device, dtype: torch.dtype, params: bool = True) -> None:
    """Give meta parameters (and buffers) real, uninitialized storage, keeping shared parameters shared and
    their attributes (TP slice, DeepSpeed flags); `to_empty` would make new, untied, unmarked ones."""
    memo: dict[int, nn.Parameter] = {}
    for m in module.modules():
        for key, p in m._parameters.items() if params else ():
            if p is None or not p.is_meta:
                continue
            if id(p) not in memo:
                new = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                memo[id(p)] = new
            m._parameters[key] = memo[id(p)]
        for key, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[key] = torch.empty(b.shape, dtype=b.dtype, device=device)
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


def _slice(key: str, kind: str, std: float, shape, seed: int, source: Weights | None, where: str, shard, device,
           rows: tuple[int, int] | None = None):
    """This rank's slice (`shard`: its TPShard, or None for the whole tensor) of the parameter `key` (its plain
    name): just those rows, drawn from the seed (pipeline/model/init.py) or read from `source`, with zero rows
    past the real length (vocabulary padding). `rows` (seeded only): of that slice, only rows [r0, r1)."""
    if source is not None:
        if key not in source:
            raise KilnError(f"{where}: the weights have no {key}; the model config differs")
        if tuple(source.shape(key)) != tuple(shape):
            raise KilnError(f"{where}: {key} has shape {tuple(source.shape(key))}, the model config needs {tuple(shape)}")
    if shard is None:
        if source is not None:
            return source.get(key)
        return initial_slice(kind, std, shape, f"{seed}:{key}", rows and (0, *rows), device)
    lo, hi = (shard.start + rows[0], shard.start + rows[1]) if rows and shard.dim == 0 else (shard.start, shard.stop)
    start, stop = min(lo, shard.length), min(hi, shard.length)
    if source is not None:
        got = source.rows(key, shard.dim, start, stop)
    else:
        got = initial_slice(kind, std, shape, f"{seed}:{key}", (shard.dim, start, stop), device,
                            rows if shard.dim == 1 else None)
    if (pad := hi - lo - (stop - start)) > 0:  # vocabulary padding
        size = list(got.shape)
        size[shard.dim] = pad
        got = torch.cat([got, got.new_zeros(size)], dim=shard.dim)
    return got


def _partition_rows(p: nn.Parameter, zero3) -> tuple[int, int]:
    """The rows of `p` (dim 0; a 1-D one: its elements) that hold this rank's ZeRO-3 partition: DeepSpeed
    keeps elements [r * ceil(n / dp), (r + 1) * ceil(n / dp)) of the flattened parameter on rank r."""
    import torch.distributed as dist

    group = zero3.get_partition_dp_group(p)
    size = -(-p.numel() // dist.get_world_size(group=group))
    start = min(p.numel(), dist.get_rank(group=group) * size)
    stop = min(p.numel(), start + size)
    row = p[0].numel() if p.dim() > 1 else 1
    return start // row, -(-stop // row)


def materialize(module: nn.Module, seed: int, device, dtype: torch.dtype, source: Weights | None = None,
                where: str = "train.init_from", zero3=None) -> nn.Module:
    """Allocate and fill this rank's slice of every parameter of every marked part under `module`.

    `zero3`: a `deepspeed.zero.Init` (not entered) to partition each parameter as soon as it is filled. Drawn
    from the seed, each data-parallel rank fills only the rows its partition covers and nothing is sent; read
    from `source`, data-parallel rank 0 reads the slice and DeepSpeed broadcasts it.
    """
    _allocate(module, device, dtype, params=zero3 is None)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # ZeRO-3 swaps parameters: every holder of a tied one
    for m in module.modules():
        for key, q in m._parameters.items():
            if q is not None:
                holders.setdefault(id(q), []).append((m, key))
    for part in parts(module):
        _, prefix, plan = part.kiln_part
        for name, kind, std, shape in plan:
            p = _param(part, name)
            if p is None:  # held by another rank (an expert under expert parallelism)
                continue
            if zero3 is not None:
                new = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                for holder, key in holders[id(p)]:
                    holder._parameters[key] = new
                p = new
            shard = getattr(p, "tp_shard", None)
            # only this rank's partition, drawn here: no broadcast (ZeRO++'s hierarchical partitions, which Kiln does
            # not configure, would copy more than the partition: DeepSpeed's own path then)
            if zero3 is not None and source is None and getattr(zero3, "zero_param_process_group", None) is None:
                zero3._convert_to_deepspeed_param(p)
                r0, r1 = _partition_rows(p, zero3)
                with torch.no_grad():
                    p[r0:r1].copy_(_slice(prefix + name, kind, std, shape, seed, None, where, shard, p.device,
                                          (r0, r1)).to(dtype))
                p.partition()  # keep 1/dp (the rows drawn), free the rest
                continue
            if zero3 is None or zero3.rank == 0:
                with torch.no_grad():
                    p.copy_(_slice(prefix + name, kind, std, shape, seed, source, where, shard, p.device).to(dtype))
            if zero3 is not None:
                zero3._convert_to_zero_parameters([p])  # broadcast from DP rank 0, keep 1/dp, free the rest
    return module


def local_slices(module: nn.Module, layout, zero3: bool) -> list[tuple[str, torch.Tensor, dict]]:
    """(plain name, this rank's tensor, slice spec) for every slice only this rank writes: one data-parallel
    replica per TP/PP position (all of them under ZeRO-3, each with its partition); a tied embedding
    repeated on the last pipeline stage is written by the first."""
    out = []
    for part in parts(module):
        _, prefix, plan = part.kiln_part
        if prefix == "embed." and layout.pp_rank != 0:
            continue
        for name, _, _, shape in plan:
            p = _param(part, name)
            if p is None or not (zero3 or _first_replica(p, layout)):
                continue
            shard = getattr(p, "tp_shard", None)
            spec = {"shape": list(shape), "tp": [shard.dim, shard.start, shard.stop, shard.padded] if shard else None,
                    "flat": None}
            tensor = p.detach()
            if zero3:
                import torch.distributed as dist

                size = p.ds_tensor.ds_numel
                start = dist.get_rank(group=p.ds_process_group) * size
                stop = min(p.ds_numel, start + size)
                if stop <= start:
                    continue  # this rank's partition is all padding
                tensor, spec["flat"] = p.ds_tensor.detach().narrow(0, 0, stop - start), [start, stop]
            out.append((prefix + name, tensor, spec))
    return out


def _first_replica(p: nn.Parameter, layout) -> bool:
    """Whether this rank is the first of the data-parallel replicas holding `p`: data-parallel rank 0, or for an
    expert (expert parallelism) rank 0 of its expert-data-parallel group."""
    if getattr(p, "allreduce", True) is False:
        from deepspeed.utils import groups

        return groups._get_expert_data_parallel_rank(p.group_name) == 0
    return layout.dp_rank == 0


def build_gpt(cfg: ModelConfig, seed: int, layout=None, run=None, device="cpu", dtype=torch.float32,
              source: Weights | None = None, zero3=None) -> GPT:
    """The whole model for PP = 1: built on meta, parallelized (when `layout`/`run` are given), materialized."""
    from pipeline.parallel.parallelize import parallelize

    with torch.device("meta"):
        model = mark_parts(GPT(cfg))
    if layout is not None:
        parallelize(model, layout, run)
    return materialize(model, seed, device, dtype, source, zero3=zero3)
