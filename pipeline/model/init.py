"""A parameter's starting value, drawn whole or one slice at a time, independently of how it is split.

`init_plan` (pipeline/model/gpt.py) says how each parameter starts: "normal" (with a std), "zeros" or
"ones". `initial_value` draws a whole tensor from a generator (a model built for use right away).
`initial_slice` draws any slice of it alone — rows [start, stop) along dim 0 or 1, a tensor-parallel rank's
share — on the rank's own device: a "normal" parameter is cut into TILE x TILE blocks of its first two
dims (1-D: runs of TILE), and block (i, j) is drawn from its own generator, seeded by (seed, the
parameter's name, i, j). So a value depends on the seed and the parameter only, never on the layout: a rank
of TP=8 draws the blocks its eighth of the matrix touches (at most one block row or column more), no rank
draws a whole stage, and the layout parity suite sees the same model at every layout
(pipeline/parallel/materialize.py). Values drawn on a GPU differ from a CPU's (another generator).
"""

from __future__ import annotations

import hashlib

import torch

TILE = 1024  # rows (and columns) of one independently seeded block


def initial_value(kind: str, std: float, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """One parameter's starting value (fp32, CPU) as `init_plan` describes it, drawn whole from `generator`."""
    if kind == "normal":
        return torch.randn(shape, generator=generator) * std
    return torch.ones(shape) if kind == "ones" else torch.zeros(shape)


def _generator(key: str, i: int, j: int, device: torch.device) -> torch.Generator:
    digest = hashlib.blake2b(f"{key}\0{i}\0{j}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def initial_slice(kind: str, std: float, shape, key: str, span: tuple[int, int, int] | None = None,
                  device: torch.device | str = "cpu", rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows [start, stop) along `dim` (`span` = (dim, start, stop), dim 0 or 1; None: all of it) of the
    starting value of the parameter `key` names (with the seed in it) — fp32, on `device`. `rows` (with a
    dim-1 span): of those columns, only rows [r0, r1) (a ZeRO-3 partition of a column slice)."""
    shape, device = tuple(shape), torch.device(device)
    dim, start, stop = span or (0, 0, shape[0] if shape else 0)
    if rows is not None and dim != 1:
        raise ValueError(f"{key}: `rows` restricts a dim-1 span; cut dim 0 with the span itself")
    size = list(shape)
    if shape:
        size[dim] = stop - start
    if rows is not None:
        size[0] = rows[1] - rows[0]
    if kind != "normal":
        return (torch.ones if kind == "ones" else torch.zeros)(size, device=device)
    if dim > 1:
        raise ValueError(f"{key}: slices along dim {dim}: only dims 0 and 1 are drawn by blocks")
    rows = (start, stop) if dim == 0 else rows or (0, shape[0])
    cols = ((start, stop) if dim == 1 else (0, shape[1])) if len(shape) > 1 else (0, 1)
    out = torch.empty(size, device=device)
    flat = out if len(shape) > 1 else out.unsqueeze(1)  # (1-D: one column)
    for i in range(rows[0] // TILE, -(-rows[1] // TILE)):
        r0, r1 = i * TILE, min((i + 1) * TILE, shape[0])
        for j in range(cols[0] // TILE, -(-cols[1] // TILE)):
            c0, c1 = j * TILE, min((j + 1) * TILE, shape[1] if len(shape) > 1 else 1)
            block = torch.randn((r1 - r0, c1 - c0, *shape[2:]), generator=_generator(key, i, j, device), device=device)
            a, b = max(r0, rows[0]), min(r1, rows[1])  # the part of the block inside the slice
            c, d = max(c0, cols[0]), min(c1, cols[1])
            flat[a - rows[0]:b - rows[0], c - cols[0]:d - cols[0]] = block[a - r0:b - r0, c - c0:d - c0]
    return out.mul_(std)
