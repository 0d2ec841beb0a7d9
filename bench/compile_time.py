"""Cold compile time: per-block (regional, `train.compile: blocks`) vs whole model (`model`), on CPU.

Each case runs in a fresh process with inductor's caches off, so every compile is cold: the GPT at
configs/train/cpu-bench.yaml's shape with `--layers` blocks, one forward + backward (the compile), then
one more (the compiled step). The reference is the whole-model compile measured in the same run; the
claim under test: regional compile time does not grow with depth (one block's graph serves all).

    PYTHONPATH=. python bench/compile_time.py [--layers 6,12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def case(scope: str, layers: int) -> dict:
    """In this process: build, compile by `scope`, time the first and the second step."""
    import torch

    from pipeline.config import load_config
    from pipeline.model.gpt import GPT
    from pipeline.parallel.parallelize import compile_blocks

    cfg = load_config("train", ROOT / "configs/train/cpu-bench.yaml", [f"model.n_layer={layers}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    if scope == "model":
        model.compile()
    else:
        compile_blocks(model)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        model(x, x)[1].backward()
        times.append(time.perf_counter() - t0)
    return {"first_step_s": times[0], "second_step_s": times[1]}


def run(scope: str, layers: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--case", scope, str(layers)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,12")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(case(args.case[0], int(args.case[1]))))
        return
    for layers in map(int, args.layers.split(",")):
        whole, blocks = run("model", layers), run("blocks", layers)
        for name, ref in (("first_step_s", "cold compile + first step"), ("second_step_s", "compiled step")):
            print(json.dumps({"bench": f"compile_blocks_{layers}l_{name}", "value": round(blocks[name], 2),
                              "unit": "s", "reference": round(whole[name], 2),
                              "ratio": round(blocks[name] / whole[name], 3),
                              "note": f"{ref}; reference: whole-model compile, same run, inductor caches off"}),
                  flush=True)


if __name__ == "__main__":
    main()
