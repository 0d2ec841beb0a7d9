"""Seeded init per rank (issue 26, item 3): the seconds one tensor-parallel rank spends drawing its slices of
one 6.7B-width block (llama: d 4096, SwiGLU 11008; wq/wk/wv/w1/w3 split by rows, wo/w2 by columns), today's
way (pipeline/model/init.py: only the blocks of its own slice) against the way it replaced, measured in the
same run: every full tensor drawn from one generator in fp32, then cut. One thread, the fastest of `--reps`.

    PYTHONPATH=. python bench/init_slices.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from bench.__main__ import append_result, machine  # noqa: E402
from pipeline.model.init import initial_slice  # noqa: E402

D, FFN = 4096, 11008
SHAPES = {"wq": (D, D, 0), "wk": (D, D, 0), "wv": (D, D, 0), "wo": (D, D, 1), "w1": (FFN, D, 0), "w3": (FFN, D, 0),
          "w2": (D, FFN, 1)}  # name: (rows, columns, the dim TP splits)


def whole_then_cut(tp: int) -> int:
    gen = torch.Generator().manual_seed(1)
    n = 0
    for rows, cols, dim in SHAPES.values():
        full = torch.randn((rows, cols), generator=gen) * 0.02
        n += full.narrow(dim, 0, (rows, cols)[dim] // tp).clone().numel()
    return n


def own_slice(tp: int) -> int:
    n = 0
    for name, (rows, cols, dim) in SHAPES.items():
        n += initial_slice("normal", 0.02, (rows, cols), f"1:blocks.0.{name}", (dim, 0, (rows, cols)[dim] // tp)).numel()
    return n


def fastest(fn, tp: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(tp)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for tp in (1, 4, 8):
        before, after = fastest(whole_then_cut, tp, args.reps), fastest(own_slice, tp, args.reps)
        append_result(args.results, "init_slices", {
            "bench": "init_slices.block_6.7b", "tp": tp, "value": round(after, 3), "unit": "s per rank",
            "reference": round(before, 3), "reference_is": "every full tensor drawn in fp32 from one generator, then cut",
            "ratio": round(after / before, 3), "elements_per_rank": sum(r * c // tp for r, c, _ in SHAPES.values()),
            "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
