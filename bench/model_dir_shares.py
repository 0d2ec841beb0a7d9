"""Bytes each rank writes for the end-of-run MODEL dir (pipeline/model/parallel_save.py), from shapes alone.

The model is built on the meta device (no memory), its tensors assigned to ranks as `kiln train` assigns them;
per world size it prints the largest rank's bytes against the ideal total/world (`value`: their ratio; whole
tensors cannot be split, so a rank holds at least the largest tensor) and against what rank 0 alone wrote
before (every tensor, in fp32).

    python bench/model_dir_shares.py [--model configs/model/70b.yaml] [--world 8 64 512] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.model.parallel_save import assign  # noqa: E402

GB = 1e9


def tensor_bytes(cfg: ModelConfig, itemsize: int = 2) -> dict[str, int]:
    """{name: bytes} of the MODEL dir's tensors (a tied head stored once), in model order."""
    with torch.device("meta"):
        model = GPT(cfg)
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = math.prod(t.shape) * itemsize
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "configs/model/70b.yaml")
    ap.add_argument("--world", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args()
    spec = yaml.safe_load(args.model.read_text())["model"]
    cfg = ModelConfig.model_validate({**spec, "vocab_size": args.vocab})
    sizes = tensor_bytes(cfg)
    total = sum(sizes.values())
    for world in args.world:
        per_rank = [sum(sizes[n] for n in names) for names in assign(sizes, min(world, len(sizes)))]
        print(json.dumps({"bench": "model_dir_shares", "model": args.model.stem, "world": world,
                          "tensors": len(sizes), "total_gb_bf16": round(total / GB, 1),
                          "largest_tensor_gb": round(max(sizes.values()) / GB, 2),
                          "max_rank_gb": round(max(per_rank) / GB, 2), "ideal_gb": round(total / world / GB, 2),
                          "before_rank0_gb_fp32": round(2 * total / GB, 1),
                          "value": round(max(per_rank) / (total / world), 3), "unit": "largest rank's bytes / ideal",
                          "reference": 1.0}), flush=True)


if __name__ == "__main__":
    main()
