"""Scale rehearsal on CPU: real layer widths, 2 layers, 4 processes, one checkpoint.

Per rank and phase (init, step, checkpoint, model_dir) it reports the peak RSS above the same run at a
tiny width (the fixed cost of Python, torch and DeepSpeed), next to the rank's 16-byte share
(fp32 weights + gradients + Adam m and v = 16 bytes per parameter the rank holds), plus init seconds and
checkpoint seconds per GB written. Then `kiln export --format hf` of the run's MODEL dir (one process):
its peak above the tiny run's export, against the largest tensor. Cases:
    tp2pp2   TP=2 x PP=2, ZeRO-1, fp32          (the 6.7b layout before configs/train/6.7b-4x8.yaml dropped PP; 2 layers)
    zero3    DP=4, ZeRO-3, fp32                 (init should hold ~1/4 of the model per rank)
    tp4      TP=4, ZeRO-1, fp32                 (one layer is enough: `--layers 1`)

    python bench/scale_rehearsal.py [--width 1.3b|6.7b|70b] [--case tp2pp2 zero3 tp4] [--layers N]
                                    [--vocab V] [--tied] [--keep DIR]

70b is Llama-2-70B's block (d 8192, 64 heads, 8 key/value heads, SwiGLU 28672). Its full vocabulary
(128,256, untied) with one layer is 2.96 B parameters, 47 GB at 16 bytes: more than a 23 GB machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.synthetic import fake_corpus  # noqa: E402

GIB = 2**30
# n_embd, n_head, n_kv_heads, ffn_hidden (None: the family's default)
WIDTHS = {"tiny": (128, 32, None, None), "1.3b": (2048, 16, None, None), "6.7b": (4096, 32, None, None),
          "70b": (8192, 64, 8, 28672)}
CASES = {
    "tp2pp2": {"parallel": {"tp": 2, "pp": 2, "zero_stage": 1}},
    "zero3": {"parallel": {"tp": 1, "pp": 1, "zero_stage": 3}},
    "tp4": {"parallel": {"tp": 4, "pp": 1, "zero_stage": 1}},
}
SHAPE = {"layers": 2, "vocab": 32000, "tied": False}  # set by main()


def config(case: str, width: str, corpus: Path, out: Path) -> Path:
    d, h, kv, ffn = WIDTHS[width]
    cfg = {
        "model": {"style": "llama", "n_layer": SHAPE["layers"], "n_head": h, "n_embd": d, "block_size": 128,
                  "vocab_size": SHAPE["vocab"], "tie_embeddings": SHAPE["tied"],
                  **({"n_kv_heads": kv} if kv else {}), **({"ffn_hidden": ffn} if ffn else {})},
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


def export(case: str, width: str, work: Path) -> dict:
    """`kiln export --format hf` of the run's MODEL dir, in one process under the RSS probe: its peak, and
    the bytes of the largest tensor it holds."""
    model = work / f"{case}-{width}" / "model"
    probe = work / f"{case}-{width}.export"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench/_rss_probe.py"), str(probe), "export", str(model), "--format", "hf",
           "--out", str(work / f"{case}-{width}-hf")]
    res = subprocess.run(cmd, env={k: v for k, v in env.items() if k != "RANK"}, cwd=ROOT, capture_output=True,
                         text=True)
    if res.returncode:
        sys.exit(f"{case} {width}: kiln export failed\n{res.stderr[-4000:]}")
    from pipeline.model.weights import open_model_weights

    weights = open_model_weights(model)
    largest = max(math.prod(weights.shape(n)) * weights.dtype(n).itemsize for n in weights.names())
    record = json.loads(Path(f"{probe}.rank0").read_text())
    return {"peak": record["peak_bytes"]["start"], "anon": record["anon_peak_bytes"]["start"], "largest": largest}


def report_export(case: str, width: str, got: dict, base: dict) -> None:
    """The export's peak above the tiny export's, against the largest tensor. Counted without file-backed pages
    (the mapped safetensors it reads, cache the kernel reclaims); the resident figure with them is given too."""
    above, resident = got["anon"] - base["anon"], got["peak"] - base["peak"]
    print(json.dumps({"bench": "scale_rehearsal", "case": case, "width": width, **SHAPE, "phase": "export_hf",
                      "largest_tensor_gib": round(got["largest"] / GIB, 3), "above_baseline_gib": round(above / GIB, 3),
                      "resident_above_baseline_gib": round(resident / GIB, 3),
                      "value": round(above / got["largest"], 3),
                      "unit": "export peak (anonymous memory) above baseline / largest tensor", "reference": 2.0}),
          flush=True)


def report(case: str, width: str, ranks: list[dict], base: list[dict]) -> None:
    for r, b in zip(ranks, base, strict=True):
        share = 16 * r["local_params"]
        line = {"bench": "scale_rehearsal", "case": case, "width": width, **SHAPE, "rank": r["rank"],
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
    ap.add_argument("--width", default="6.7b", choices=["1.3b", "6.7b", "70b"])
    ap.add_argument("--case", nargs="+", default=["tp2pp2", "zero3"], choices=list(CASES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tied", action="store_true", help="tie the embedding and the head")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    SHAPE.update(layers=args.layers, vocab=args.vocab, tied=args.tied)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = fake_corpus(work / "corpus", vocab_size=args.vocab, train_docs=400, val_docs=40)
    for case in args.case:
        base = run(case, "tiny", corpus, work)
        base_export = export(case, "tiny", work)
        ranks = run(case, args.width, corpus, work)
        report(case, args.width, ranks, base)
        report_export(case, args.width, export(case, args.width, work), base_export)
    if not args.keep:
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)


if __name__ == "__main__":
    main()
