"""A mixture of experts vs a dense model with the same active parameters, same steps, on the demo corpus (CPU).

    PYTHONPATH=. python bench/moe_quality.py [--steps 300] [--seeds 0] [--out runs/bench-moe]

Builds the demo corpus (data_prep/demo_corpus.py) and preps it as `kiln demo` does (configs/prep/demo.yaml), then
trains with `kiln train` (1 process, fp32) the demo model (configs/model/demo.yaml: llama, 4 layers, d=192, SwiGLU
width 512) and a Mixtral-style MoE of the same shape whose MLP is 4 experts of width 256, 2 per token: the same
active parameters (plus a 192 x 4 router per layer), twice the MLP parameters in all. Same data order, batch,
steps and schedule. Prints one JSON line per figure {"bench", "value", "unit", "reference", "ratio"}: the MoE's
final validation loss against the dense model's (ratio < 1: the MoE is better), and each model's parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from pipeline.config import load_config  # noqa: E402
from pipeline.model.flops import param_counts  # noqa: E402

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
MOE = ["model.style=mixtral", "model.n_experts=4", "model.experts_per_token=2", "model.ffn_hidden=256"]


def emit(bench: str, value: float, unit: str, reference: float, **extra) -> None:
    print(json.dumps({"bench": bench, "value": round(value, 6), "unit": unit, "reference": round(reference, 6),
                      "ratio": round(value / reference, 4) if reference else None, **extra}), flush=True)


def kiln(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--json"], env=ENV, cwd=ROOT,
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def prepped(out: Path, *sets: str, name: str = "prep") -> Path:
    """The demo corpus prepped as `kiln demo` does (plus `sets` over configs/prep/demo.yaml) into out/name, once."""
    from data_prep.demo_corpus import write_demo_corpus

    prep = out / name
    if not (prep / "manifest.json").exists():
        if not (out / "corpus").is_dir():
            write_demo_corpus(out / "corpus")
        kiln("prep", str(out / "corpus"), "--out", str(prep), "--config", str(ROOT / "configs/prep/demo.yaml"),
             "--workers", "2", *[a for s in ("tracking.enabled=false", *sets) for a in ("--set", s)])
    return prep


def train(name: str, prep: Path, out: Path, steps: int, seed: int, extra: list[str]) -> tuple[dict, list[str]]:
    sets = [f"data.paths=[{prep}]", f"out={out / f'{name}-{seed}'}", f"train.steps={steps}", f"train.seed={seed}",
            "parallel.tp=1", "tracking.enabled=false", f"train.eval_every={steps}", "train.eval_batches=32",
            f"checkpoint.every={steps}", *extra]
    summary = kiln("train", "--config", str(ROOT / "configs/train/demo-cpu.yaml"), *[a for s in sets for a in ("--set", s)])
    return summary, sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/bench-moe")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    prep = prepped(out)
    for seed in args.seeds:
        dense, sets = train("dense", prep, out, args.steps, seed, [])
        moe, moe_sets = train("moe", prep, out, args.steps, seed, MOE)
        counts = {}
        for name, s in (("dense", sets), ("moe", moe_sets)):
            cfg = load_config("train", ROOT / "configs/train/demo-cpu.yaml", s).model
            counts[name] = param_counts(cfg, json.loads((prep / "manifest.json").read_text())["tokenizer"]["vocab_size"])
        emit("moe_quality.val_loss", moe["val_loss"], "nats/token", dense["val_loss"], seed=seed, steps=args.steps,
             tokens=moe["tokens"], model="mixtral 4 experts x 256, top-2", reference_model="llama SwiGLU 512")
        emit("moe_quality.active_params", counts["moe"]["active"], "params", counts["dense"]["active"], seed=seed)
        emit("moe_quality.total_params", counts["moe"]["total"], "params", counts["dense"]["total"], seed=seed)


if __name__ == "__main__":
    main()
