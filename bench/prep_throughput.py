"""Prep throughput on the demo corpus (Python's own docs, offline). Prints JSON lines:
{"bench", "value", "unit", "reference", "ratio"}.

1. cleaning + dedup, documents/s on one core, in-process (every filter, langid, hashes,
   MinHash signatures, bucket-wise exact/LSH grouping, clustering).
2. tokenize stage end to end (read docs.jsonl -> sentencepiece encode -> write .bin/.idx)
   against raw `SentencePieceProcessor.encode` of the same texts on the same cores,
   measured in this run: 1 core in-process, and N cores as Ray tasks (warm Ray).
3. MinHash/dedup memory per million documents: measured from the key files the clean
   stage wrote, and computed from the array layout.

Run: PYTHONPATH=. python bench/prep_throughput.py [--repeat 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from data_prep import buckets, partitions, stages  # noqa: E402
from data_prep.demo_corpus import write_demo_corpus  # noqa: E402
from data_prep.steps.minhash_dedup import keep_first  # noqa: E402
from data_prep.tokenizer import train_tokenizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def emit(bench: str, value: float, unit: str, reference: float | None = None, **extra) -> None:
    ratio = round(value / reference, 3) if reference else None
    print(json.dumps({"bench": bench, "value": round(value, 1), "unit": unit,
                      "reference": round(reference, 1) if reference else None, "ratio": ratio, **extra}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=8, help="copies of the demo texts for the tokenize bench")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-prep-"))
    files = write_demo_corpus(tmp / "corpus")
    cfg = load_config("prep", ROOT / "configs/prep/demo.yaml", base={"workers": args.workers})

    # 1. clean + dedup, one core, no Ray
    _, parts = partitions.plan(files, cfg.shard_docs, cfg.partition_bytes)
    stages.clean_partition(parts[0], cfg, str(tmp / "warm"))  # load langid model etc. once, untimed
    times = []
    for rep in range(3):  # best of 3: the machine is shared and noisy
        work = tmp / f"work{rep}"
        t = time.perf_counter()
        clean = [stages.clean_partition(p, cfg, str(work)) for p in parts]
        res = [buckets.dedup_bucket(b, [p["index"] for p in parts], str(work), cfg) for b in range(cfg.dedup_buckets)]
        keep_first(*buckets.merge_pairs(res))
        times.append(time.perf_counter() - t)
    dt = min(times)
    n = sum(s["records"] for s in clean)
    mb = sum(f.stat().st_size for f in files) / 1e6
    emit("prep_clean_dedup_docs_per_s_1core", n / dt, "docs/s", None, docs=n, mb=round(mb, 2), seconds=round(dt, 2),
         kept=sum(s["kept"] for s in clean))

    # 3. dedup key memory (measured on disk; computed from the layout)
    kept = sum(s["kept"] for s in clean)
    npz = sum(k.stat().st_size for p in parts for k in (work / "clean" / f"{p['index']:05d}").glob("*.np[yz]"))
    emit("prep_minhash_keys_mb_per_million_docs_measured", npz / kept, "MB/1M docs", None,
         note="keys_*.npz bytes on disk / kept docs (bytes per doc = MB per million docs)")
    per_doc = 8 * (2 + 2 * cfg.minhash.bands + 1) + 8  # exact hash+uid, bands x (key+uid), sample key, sketch offset
    emit("prep_minhash_keys_mb_per_million_docs_computed", per_doc, "MB/1M docs", None,
         note=f"{cfg.minhash.bands} bands x (8 B key + 8 B uid) + exact (16 B) + sample (8 B) + sketch offset (8 B), "
              f"plus 4 B per distinct shingle up to {cfg.minhash.sketch} (the sketch) and 12 B per distinct line "
              f"(boilerplate keys); a bucket task holds 1/{cfg.dedup_buckets} of the keys")

    # 2. tokenize stage vs raw sentencepiece, same texts, same cores
    texts = [json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")]
    tok = train_tokenizer(texts, tmp / "tok.model", vocab_size=4096, threads=2)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    big = [f"{t}\n{i}" for i in range(args.repeat) for t in texts]
    nparts = 2 * args.workers
    twork = tmp / "twork"
    for p in range(nparts):
        d = twork / "clean" / f"{p:05d}"
        d.mkdir(parents=True)
        with open(d / "docs.jsonl", "w", encoding="utf-8") as f:
            for i, t in enumerate(big[p::nparts]):
                f.write(json.dumps({"id": f"{p}-{i}", "text": t, "lang": "en"}, ensure_ascii=False) + "\n")
    (twork / "tok").mkdir()
    drop = np.zeros(0, np.int64)

    def raw(threads: int) -> tuple[float, float, int]:
        t, c = time.perf_counter(), time.process_time()
        ids = sp.encode(big, num_threads=threads)
        return time.perf_counter() - t, time.process_time() - c, sum(map(len, ids)) + len(ids)  # + EOS, as the stage writes

    def stage_inproc() -> tuple[float, float, int]:
        for m in (twork / "tok").glob("*.json"):
            m.unlink()
        t, c = time.perf_counter(), time.process_time()
        r = [stages.tokenize_partition(p, drop, str(tok), cfg, str(twork), str(tmp / "out1")) for p in range(nparts)]
        return time.perf_counter() - t, time.process_time() - c, sum(s["tokens"] for x in r for s in x["shards"].values())

    raw(1)  # warm caches
    rt1, st1 = [], []
    for _ in range(3):  # interleaved, best of 3: the machine is shared and noisy
        *r, ntok = raw(1)
        rt1.append(r)
        *st, ntok_stage = stage_inproc()
        st1.append(st)
        assert ntok == ntok_stage, (ntok, ntok_stage)
    cpu_ratio = min(c for _, c in rt1) / min(c for _, c in st1)
    emit("prep_tokenize_tokens_per_s_1core", ntok / min(w for w, _ in st1), "tokens/s", ntok / min(w for w, _ in rt1),
         tokens=ntok, cpu_time_ratio=round(cpu_ratio, 3),
         reference_is="raw sentencepiece encode, 1 thread, same texts (wall, best of 3 each, interleaved)")

    import ray

    from data_prep.runner import loopback_only

    loopback_only()
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(stages.tokenize_partition)
        ray.get([remote.remote(p, drop, str(tok), cfg, str(twork), str(tmp / "warm_out")) for p in range(nparts)])
        best_stage, best_raw = 0.0, 0.0
        for _ in range(3):
            for m in (twork / "tok").glob("*.json"):
                m.unlink()
            t = time.perf_counter()
            out = ray.get([remote.remote(p, drop, str(tok), cfg, str(twork), str(tmp / "outN")) for p in range(nparts)])
            st = time.perf_counter() - t
            rt, _, _ = raw(args.workers)
            best_stage, best_raw = max(best_stage, ntok / st), max(best_raw, ntok / rt)
        assert sum(s["tokens"] for x in out for s in x["shards"].values()) == ntok
    finally:
        ray.shutdown()
    emit(f"prep_tokenize_tokens_per_s_{args.workers}cores_ray", best_stage, "tokens/s", best_raw, tokens=ntok,
         reference_is=f"raw sentencepiece encode, num_threads={args.workers}, same texts (best of 3 each, interleaved)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
