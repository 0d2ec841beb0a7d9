"""Eval throughput (tokens scored per second) of a fp32 model, against a plain PyTorch loop.

Prints JSON lines {"bench", "value", "unit", "reference", "ratio"}. The reference is a plain
`model(x)` + cross-entropy loop over non-overlapping windows, measured in the same run on the
same tokens. `kiln eval` slides with stride block_size/2, so it runs ~2 forward tokens per
scored token: expect ratio ~0.5 there and ~1.0 with stride = block_size (harness overhead only).

Other stages reuse `measure(model, data_dir, ...)`, e.g. to compare int8/gptq4 models:

    from bench.eval_throughput import measure, plain_reference
    ref = plain_reference(fp32_model, data_dir)
    print(json.dumps(measure(int8_model, data_dir, name="eval_int8", reference=ref)))

    PYTHONPATH=. python bench/eval_throughput.py [--max-tokens 16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.corpus import PreparedCorpus  # noqa: E402
from pipeline.evaluate import score_stream  # noqa: E402


@torch.inference_mode()
def plain_reference(model: torch.nn.Module, data_dir: str | Path, split: str = "val", max_tokens: int = 16384,
                    block_size: int | None = None, batch_size: int = 8) -> float:
    """Tokens/s of the simplest loop: non-overlapping windows, forward + summed CE."""
    block = block_size or model.cfg.block_size
    stream = PreparedCorpus(data_dir).stream(split)
    n = min(len(stream) - 1, max_tokens) // block * block
    data = torch.from_numpy(stream.read(0, n + 1))
    x, y = data[:-1].view(-1, block), data[1:].view(-1, block)
    model.eval()
    model(x[:1])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, x.size(0), batch_size):
        logits, _ = model(x[i:i + batch_size])
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y[i:i + batch_size].reshape(-1), reduction="sum")
    return n / (time.perf_counter() - t0)


def measure(model: torch.nn.Module, data_dir: str | Path, split: str = "val", max_tokens: int = 16384,
            block_size: int | None = None, stride: int | None = None, batch_size: int = 8,
            name: str = "eval_fp32", reference: float | None = None) -> dict:
    """One JSON record: scored tokens/s of Kiln's sliding-window eval (the `kiln eval` code path)."""
    block = block_size or model.cfg.block_size
    stream = PreparedCorpus(data_dir).stream(split)
    res = score_stream(model, stream, block, max_tokens, stride=stride, batch_size=batch_size, show=False)
    value = res["tokens"] / res["forward_s"]
    return {"bench": name, "value": round(value, 1), "unit": "tokens/s",
            "reference": round(reference, 1) if reference else None,
            "ratio": round(value / reference, 3) if reference else None,
            "tokens": res["tokens"], "stride": res["stride"], "block_size": block,
            "threads": torch.get_num_threads()}


def main() -> None:
    from factories import fake_corpus  # tests/factories.py: a prepared corpus without `kiln prep`

    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3, help="alternate reference and Kiln runs; keep the best of each")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # the design's CPU reference model: GPT-2 style 6L/6H/384d, ctx 256, vocab 8192, fp32
    cfg = ModelConfig(style="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_corpus(Path(tmp) / "c", vocab_size=8192, train_docs=4, val_docs=600, shards=1)
        variants = ((None, "eval_fp32_stride_half"), (cfg.block_size, "eval_fp32_stride_full"))
        ref, best = 0.0, {}
        for _ in range(args.repeats):  # interleaved, so load changes hit both sides alike
            ref = max(ref, plain_reference(model, data, max_tokens=args.max_tokens))
            for stride, name in variants:
                rec = measure(model, data, max_tokens=args.max_tokens, stride=stride, name=name)
                if rec["value"] > best.get(name, {"value": 0})["value"]:
                    best[name] = rec
        for rec in best.values():
            rec.update(reference=round(ref, 1), ratio=round(rec["value"] / ref, 3), repeats=args.repeats)
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    main()
