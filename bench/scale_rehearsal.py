"""Scale rehearsal on CPU: real layer widths, 2 layers, 4 processes, one checkpoint.

Per rank and phase (init, step, checkpoint, model_dir) it reports the peak RSS above the same run at a
tiny width (the fixed cost of Python, torch and DeepSpeed), next to the rank's 16-byte share
(fp32 weights + gradients + Adam m and v = 16 bytes per parameter the rank holds), plus init seconds and
checkpoint seconds per GB written. Cases:
    tp2pp2   TP=2 x PP=2, ZeRO-1, fp32          (the 6.7b layout before configs/train/6.7b-4x8.yaml dropped PP; 2 layers)
    zero3    DP=4, ZeRO-3, fp32                 (init should hold ~1/4 of the model per rank)

    python bench/scale_rehearsal.py [--width 1.3b|6.7b] [--case tp2pp2 zero3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.synthetic import fake_corpus  # noqa: E402

GIB = 2**30
WIDTHS = {"tiny": (128, 32), "1.3b": (2048, 16), "6.7b": (4096, 32)}  # n_embd, n_head
CASES = {
    "tp2pp2": {"parallel": {"tp": 2, "pp": 2, "zero_stage": 1}},
    "zero3": {"parallel": {"tp": 1, "pp": 1, "zero_stage": 3}},
}


def config(case: str, width: str, corpus: Path, out: Path) -> Path:
    d, h = WIDTHS[width]
    cfg = {
        "model": {"style": "llama", "n_layer": 2, "n_head": h, "n_embd": d, "block_size": 128, "vocab_size": 32000,
                  "tie_embeddings": False},
        **CASES[case],
        "train": {"micro_batch_size": 1, "grad_accum": 1, "steps": 2, "warmup_steps": 1, "precision": "fp32",
                  "log_every": 1, "lr": 1e-4, "min_lr": 1e-5},
        "checkpoint": {"every": 2, "keep": 1},
        "tracking": {"enabled": False},
        "data": {"paths": [str(corpus)], "val_tokens": 0},
        "out": str(out),
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def run(case: str, width: str, corpus: Path, work: Path) -> list[dict]:
    out = work / f"{case}-{width}"
    cfg = config(case, width, corpus, out)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    probe = work / f"{case}-{width}.rss"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", str(ROOT / "bench/_rss_probe.py"),
           str(probe), "train", "--config", str(cfg)]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{case} {width}: kiln train failed\n{res.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{probe}.rank{r}").read_text()) for r in range(4)]
    written = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    for r in ranks:
        r["checkpoint_bytes"] = written
    return ranks


def report(case: str, width: str, ranks: list[dict], base: list[dict]) -> None:
    for r, b in zip(ranks, base, strict=True):
        share = 16 * r["local_params"]
        line = {"bench": "scale_rehearsal", "case": case, "width": width, "rank": r["rank"],
                "local_params": r["local_params"], "share_gib": round(share / GIB, 3),
                "init_s": round(r["seconds"].get("init", 0), 1),
                "checkpoint_s_per_gb": round(r["seconds"].get("checkpoint", 0) / (r["checkpoint_bytes"] / 1e9), 2),
                "checkpoint_gb": round(r["checkpoint_bytes"] / 1e9, 2),
                "model_dir_s": round(r["seconds"].get("model_dir", 0), 1)}
        worst = 0.0
        for phase in ("build", "init", "step", "checkpoint", "model_dir"):
            if phase in r["peak_bytes"]:
                above = r["peak_bytes"][phase] - b["peak_bytes"].get(phase, b["peak_bytes"]["start"])
                line[f"{phase}_above_baseline_gib"] = round(above / GIB, 3)
                worst = max(worst, above)
        line["value"] = round(worst / share, 3)
        line["unit"] = "peak above baseline / 16-byte share"
        line["reference"] = 1.5
        print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", default="6.7b", choices=["1.3b", "6.7b"])
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = fake_corpus(work / "corpus", vocab_size=32000, train_docs=400, val_docs=40)
    for case in args.case:
        base = run(case, "tiny", corpus, work)
        ranks = run(case, args.width, corpus, work)
        report(case, args.width, ranks, base)
    if not args.keep:
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)


if __name__ == "__main__":
    main()
