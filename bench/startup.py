"""Start-up on a large prepared corpus: seconds from launch to the first training step.

Generates a prepared corpus of ~2 GB (random token documents written as real Megatron shards with
a manifest) and a tiny one, then starts `kiln train` (2 ranks, tiny model, 1 step) on each and
reports, per rank, the seconds before step 1 on the large corpus next to the same on the tiny one
(the fixed cost of Python, torch and DeepSpeed): the difference is what start-up spends on the data.

    python bench/startup.py [--gb 2] [--code DIR]    # --code: run another checkout's pipeline (a "before")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.indexed import IndexedWriter  # noqa: E402


def make_corpus(path: Path, tokens: int, shards: int = 8, vocab: int = 32000, doc: int = 2048) -> Path:
    """`tokens` random tokens in `shards` train shards (plus a small val shard), with a manifest."""
    if (path / "manifest.json").exists():
        return path
    rng = np.random.default_rng(0)
    entries = []
    for split, count, n in (("train", tokens, shards), ("val", 200_000, 1)):
        for k in range(n):
            rel = f"shards/{split}_{k:05d}"
            with IndexedWriter(path / rel, np.uint16) as w:
                for _ in range(count // n // doc):
                    w.add(rng.integers(3, vocab, size=doc, dtype=np.uint16))
            entries.append({"path": rel + ".bin", "split": split, **w.result})
    stand_in = b"stand-in"  # never loaded before step 1; its sha256 is checked against the manifest
    (path / "tokenizer.model").write_bytes(stand_in)
    manifest = {"version": 1, "inputs": [], "config": {"bench": True}, "counts": {},
                "tokens": {s: sum(e["tokens"] for e in entries if e["split"] == s) for s in ("train", "val")},
                "tokenizer": {"path": "tokenizer.model", "sha256": hashlib.sha256(stand_in).hexdigest(),
                              "vocab_size": vocab},
                "shards": entries, "digest": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def first_step(corpus: Path, work: Path, name: str, code: Path) -> list[float]:
    out = work / name
    subprocess.run(["rm", "-rf", "--", str(out)], check=False)  # a fresh run each time, never a resume
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    probe = work / f"{name}.probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "bench/_rss_probe.py"),
           str(probe), "train", "--config", str(ROOT / "configs/train/tiny-cpu.yaml"), "--out", str(out),
           "--set", f"data.paths=[{corpus}]", "--set", "train.steps=1", "--set", "parallel.zero_stage=1",
           "--set", "data.val_tokens=0"]
    subprocess.run(["sync"], check=False)
    res = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{name}: kiln train failed\n{res.stderr[-3000:]}")
    return [json.loads(Path(f"{probe}.rank{r}").read_text())["first_step_s"] for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose pipeline/ to run")
    ap.add_argument("--work", type=Path, help="keep corpora and runs here (default: a temp dir, removed)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-startup-"))
    t0 = time.perf_counter()
    big = make_corpus(work / "big", int(args.gb * 1e9 / 2))
    tiny = make_corpus(work / "tiny", 2_000_000, shards=1)
    size = sum(f.stat().st_size for f in (big / "shards").iterdir())
    print(f"# corpora ready in {time.perf_counter() - t0:.0f} s ({size / 1e9:.2f} GB)", file=sys.stderr)
    for run in range(2):  # tiny then big, twice: the second pass sees a warm page cache for both
        base = first_step(tiny, work, f"tiny{run}", args.code)
        large = first_step(big, work, f"big{run}", args.code)
    for rank in range(2):
        print(json.dumps({"bench": "startup", "corpus_gb": round(size / 1e9, 2), "rank": rank, "code": str(args.code),
                          "value": round(large[rank], 2), "unit": "s before step 1",
                          "reference": round(base[rank], 2), "reference_is": "same run on a 4 MB corpus",
                          "data_s": round(large[rank] - base[rank], 2)}), flush=True)
    if not args.work:
        subprocess.run(["rm", "-rf", "--", str(work)], check=False)


if __name__ == "__main__":
    main()
