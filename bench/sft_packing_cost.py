"""What keeping packed conversations apart costs in attention, forward + backward, on CPU.

Rows of `--seq` tokens holding conversations of random lengths (pipeline/sft/packing.py's segments), fp32:

    causal        SDPA is_causal: position resets alone (`Packing.positions`) cost nothing over
                  plain causal attention, but attention still crosses conversations   <- the reference
    doc_mask      SDPA with the block-diagonal causal boolean mask of `Packing` (pipeline/model/layers.py), built per batch (exact)
    flex          torch's flex_attention with a block mask from the segments (exact; skips whole blocks that
                  cross conversations), eager — on CPU without compilation it may be refused or slow

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/sft_packing_cost.py [--seq 1024 --batch 4 --heads 8 --mean-conv 200]

Prints JSON lines {"bench", "value", "unit", "reference", "ratio"}; value and reference in ms per step (median).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.model.layers import Packing


def segments(batch: int, seq: int, mean: int, seed: int = 0) -> torch.Tensor:
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq:
            row += [len(set(row))] * max(1, int(rng.expovariate(1 / mean)))
        rows.append(row[:seq])
    return torch.tensor(rows)


def step(variant: str, q, k, v, seg) -> None:
    if variant == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif variant == "doc_mask":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=Packing(seg).mask)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def same_doc(b, h, qi, ki):
            return (seg[b, qi] == seg[b, ki]) & (ki <= qi)

        mask = create_block_mask(same_doc, seg.shape[0], None, seg.shape[1], seg.shape[1], device="cpu")
        out = flex_attention(q, k, v, block_mask=mask)
    out.sum().backward()


def time_variant(variant: str, args) -> float:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
    seg = segments(args.batch, args.seq, args.mean_conv)
    step(variant, q, k, v, seg)  # warm-up
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step(variant, q, k, v, seg)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mean-conv", type=int, default=200, help="mean conversation length in tokens")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    ref = time_variant("causal", args)
    shape = {"batch": args.batch, "seq": args.seq, "heads": args.heads, "head_dim": args.head_dim,
             "mean_conv": args.mean_conv, "threads": torch.get_num_threads()}
    for variant in ("causal", "doc_mask", "flex"):
        try:
            ms = ref if variant == "causal" else time_variant(variant, args)
        except Exception as err:  # noqa: BLE001 - a variant this torch/CPU cannot run is reported, not fatal
            print(json.dumps({"bench": f"sft_packing_cost/{variant}", "error": str(err).splitlines()[0][:200]}))
            continue
        print(json.dumps({"bench": f"sft_packing_cost/{variant}", "value": round(ms, 2), "unit": "ms per step",
                          "reference": round(ref, 2), "ratio": round(ms / ref, 3), "shape": shape}), flush=True)


if __name__ == "__main__":
    main()
