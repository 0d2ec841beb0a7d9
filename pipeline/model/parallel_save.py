"""The MODEL dir at the end of a multi-rank run, written by every rank at once.

One rank streaming every weight into one file is O(model) while the others wait in a collective under
its timeout: at 70B that is ~140 GB in bf16 and most likely longer than the timeout. So the tensors are
assigned whole to ranks, balanced by bytes (`assign`: the same answer on every rank, from names and shapes
alone), and each rank reads its tensors from the last checkpoint's slices (open_weights) and writes and
hashes its own shard, model-0000r-of-0000N.safetensors: ~1/world of the bytes per rank (at least the
largest tensor: bench/model_dir_shares.py). Then one small
all_gather_object of {file: sha256} (or the error a rank hit, so every rank fails together rather than
waiting), after which rank 0 writes the small files (the index, config.json, the tokenizer, SHA256SUMS)
and renames the temp dir into place: a reader never sees half a MODEL dir, and a crash leaves the old one.

The index is the one transformers writes, plus in its metadata each shard's sha256 (io.SHARD_SUMS, checked
against SHA256SUMS by verify_sums) and the rank that wrote it (WRITERS).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import KilnError, ModelConfig, first_line
from pipeline.model.io import FORMAT_VERSION, SHARD_SUMS, finish_model_dir, new_temp_dir, save_model_dir
from pipeline.model.weights import INDEX, Weights, open_weights, shard_name, write_index, write_tensors

WRITERS = "kiln_written_by"  # in the index's metadata: {shard file: the rank that wrote it}


def assign(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Tensor names (with their bytes, in model order) -> n lists, balanced by bytes: largest first, each to
    the least-loaded list (ties: the lowest index); each list keeps model order. Deterministic."""
    load, out = [0] * n, [[] for _ in range(n)]
    order = {name: i for i, name in enumerate(sizes)}
    for name in sorted(sizes, key=lambda k: (-sizes[k], order[k])):
        i = min(range(n), key=lambda j: (load[j], j))
        load[i] += sizes[name]
        out[i].append(name)
    return [sorted(names, key=order.__getitem__) for names in out]


def save_model_dir_parallel(source: Weights | str | Path | None, cfg: ModelConfig, out: str | Path,
                            tokenizer: str | Path | None, meta: dict | None, dtype: torch.dtype | None = None) -> Path:
    """Every rank calls this. `source`: the weights (the same on every rank; lazy, read only where this rank
    writes), or rank 0's checkpoint dir to read them from (the other ranks may pass None: they learn it here,
    after rank 0 has published it). `meta` and `tokenizer` are used on rank 0 only. One process (no process
    group, or world 1): model.safetensors."""
    out = Path(out)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return save_model_dir(source if isinstance(source, Weights) else open_weights(source), cfg, out, tokenizer,
                              meta, dtype=dtype)
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [str(new_temp_dir(out)), None if isinstance(source, Weights) else str(source)] if rank == 0 else [None, None]
    dist.broadcast_object_list(box, src=0)  # all ranks arrive here together, at the end of training
    tmp = Path(box[0])
    mine: dict = {}
    try:  # any failure is reported in the gather below: every rank must reach it, or the others wait it out
        weights = source if isinstance(source, Weights) else open_weights(box[1])
        dtype_of = {name: dtype or weights.dtype(name) for name in weights.names()}
        shape_of = {name: weights.shape(name) for name in dtype_of}
        sizes = {name: math.prod(shape_of[name]) * dtype_of[name].itemsize for name in dtype_of}
        shards = assign(sizes, min(world, len(sizes)))
        files = [shard_name(i, len(shards)) for i in range(len(shards))]
        if rank < len(shards):
            items = ((name, weights.get(name).to(dtype_of[name])) for name in shards[rank])
            entries = [(name, dtype_of[name], shape_of[name]) for name in shards[rank]]
            mine = {"file": files[rank], "sha256": write_tensors(
                tmp / files[rank], items, entries,
                {"format": "pt", "kiln_format": str(FORMAT_VERSION), "kiln_writer_rank": str(rank)})}
    except Exception as err:
        mine = {"error": f"rank {rank}: {first_line(err)}"}
    results: list = [None] * world
    dist.all_gather_object(results, mine)  # {file, sha256} per writing rank: a few bytes each
    errors = [r["error"] for r in results if "error" in r]
    written = {r["file"]: (i, r["sha256"]) for i, r in enumerate(results) if "file" in r}
    if not errors and set(written) != set(files):
        errors = [f"{tmp}: no rank reported writing {sorted(set(files) - set(written))[0]}"]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise KilnError(f"{out}: the MODEL dir was not written ({errors[0]})")
    if rank == 0:
        try:
            digests = {f: sha for f, (_, sha) in written.items()}
            write_index(tmp / INDEX, dict(zip(files, shards, strict=True)), sum(sizes.values()),
                        {SHARD_SUMS: digests, WRITERS: {f: r for f, (r, _) in written.items()}})
            finish_model_dir(tmp, out, cfg, tokenizer, meta, digests)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
