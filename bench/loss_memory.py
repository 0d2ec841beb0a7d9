"""Peak memory of the loss, forward + backward: logits then cross-entropy vs the chunked loss from hidden states.

Shape of a 125m micro-batch (configs/model/125m.yaml: d = 768; vocabulary 32000, batch 8 x 1024 tokens
by default), fp32 on CPU. Each variant runs in a fresh process (so one variant's freed memory cannot
hide another's peak) that allocates its inputs, records its peak RSS (getrusage high-water mark), runs
the loss forward and backward, and reports how far the peak rose above the inputs:

    plain       logits = h @ W^T, then gpt.cross_entropy (what the model did before)  <- the reference
    chunked     ChunkedCrossEntropy(--chunk): loss and gradients a chunk of tokens at a time
    vp_logits   the logits-based vocab-parallel loss (pipeline parallelism) on a TP group of one process

    PYTHONPATH=. python bench/loss_memory.py [--tokens 8192 --vocab 32000 --dim 768 --chunk 4096]

Prints JSON lines {"bench", "value", "unit", "reference", "ratio"}; value and reference in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "chunked", "vp_logits")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(variant: str, tokens: int, vocab: int, dim: int, chunk: int) -> dict:
    """In this (fresh) process: the rise of peak RSS over the inputs while the loss runs forward and backward."""
    import torch
    import torch.distributed as dist

    from pipeline.model.gpt import cross_entropy
    from pipeline.model.loss import ChunkedCrossEntropy
    from pipeline.model.tensor_parallel import VocabParallelCrossEntropy

    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(tokens, dim, generator=gen) * 0.5).requires_grad_()
    w = (torch.randn(vocab, dim, generator=gen) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # gradients land in memory counted as inputs
    if variant == "vp_logits":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    before = peak_bytes()
    if variant == "chunked":
        loss = ChunkedCrossEntropy(chunk)(h, w, targets)
    elif variant == "plain":
        loss = cross_entropy(h @ w.t(), targets)
    else:
        loss = VocabParallelCrossEntropy(dist.group.WORLD, 0, vocab, vocab, 1)(h @ w.t(), targets)
    loss.backward()
    return {"variant": variant, "rise": peak_bytes() - before, "loss": float(loss)}


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--dim", str(args.dim), "--chunk", str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="batch x sequence")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=4096, help="train.loss_chunk")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(measure(args.worker, args.tokens, args.vocab, args.dim, args.chunk)))
        return
    results = {v: run_variant(v, args) for v in VARIANTS}
    ref = results["plain"]
    mib = 2**20
    shape = f"{args.tokens} tokens x vocab {args.vocab}, d {args.dim}"
    for v in VARIANTS[1:]:
        r = results[v]
        if abs(r["loss"] - ref["loss"]) > 1e-4 * abs(ref["loss"]):
            raise SystemExit(f"{v} loss {r['loss']} differs from plain {ref['loss']}")
        name = f"loss_peak_memory_{v}" + (f"_chunk{args.chunk}" if v == "chunked" else "")
        print(json.dumps({"bench": name, "value": round(r["rise"] / mib, 1), "unit": "MiB",
                          "reference": round(ref["rise"] / mib, 1), "ratio": round(r["rise"] / ref["rise"], 3),
                          "shape": shape, "fp32_logits_copy_mib": round(args.tokens * args.vocab * 4 / mib, 1)}))


if __name__ == "__main__":
    main()
