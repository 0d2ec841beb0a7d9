"""`kiln prep` at scale: a generated web-like corpus (bench/_synth_corpus.py: 7 languages, log-normal
lengths, exact/near copies, site boilerplate, PII, evaluation quotes, bad records) prepared with 2 Ray
workers and --decontaminate, every step on. Prints one JSON line per size:
docs/s per stage, peak RSS of the driver and of each kind of Ray process (VmHWM, sampled every second
from /proc), bytes of intermediate files (DIR/work) per document by kind, and the wall time.

Run: PYTHONPATH=. nice python bench/prep_scale.py --docs 50000 250000 [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synth_corpus import write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def kind(p: psutil.Process, driver: int) -> str:
    if p.pid == driver:
        return "driver"
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "other"
    if cmd and (cmd[0].startswith("ray::") or any("default_worker.py" in c for c in cmd)):
        return "ray_worker"  # a task process (Ray renames it ray::<task>)
    return "ray_system"  # gcs_server, raylet, log monitor...


class PeakMemory(threading.Thread):
    """Peak resident memory of a process tree, per process, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak: dict[int, tuple[str, int]] = {}

    def run(self) -> None:
        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                kb = hwm_kb(p.pid)
                if kb > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (kind(p, self.pid), kb)
            self.stop.wait(self.every)

    def by_kind(self) -> dict[str, dict]:
        out = defaultdict(list)
        for k, kb in self.peak.values():
            out[k].append(kb)
        return {k: {"processes": len(v), "max_mb": round(max(v) / 1024, 1), "sum_mb": round(sum(v) / 1024, 1)}
                for k, v in out.items()}


def work_bytes(out: Path) -> dict[str, int]:
    groups = defaultdict(int)
    for p in (out / "work").rglob("*"):
        if p.is_file():
            name = p.name
            key = ("docs.jsonl" if name == "docs.jsonl" else "keys_*.npz" if name.startswith("keys_")
                   else "sketch_*.npy" if name.startswith("sketch") else "decontam index" if "decontam" in str(p)
                   else "reports (removed/quarantine/stats)" if name.endswith((".jsonl", ".json")) else name)
            groups[key] += p.stat().st_size
    groups["shards (output)"] = sum(p.stat().st_size for p in (out / "shards").iterdir())
    return dict(groups)


def run(docs: int, workers: int, root: Path) -> dict:
    t = time.time()
    truth = write_corpus(root / f"synth{docs}", docs)
    gen_s = time.time() - t
    corpus = root / f"synth{docs}"
    out = root / f"out{docs}"
    input_bytes = sum(p.stat().st_size for p in (corpus / "corpus").iterdir())
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", str(corpus / "corpus"), "--out", str(out), "--workers",
           str(workers), "--vocab-size", "8192", "--decontaminate", str(corpus / "evals"),
           "--set", "tracking.enabled=false", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = PeakMemory(proc.pid)
    mem.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - t
    mem.stop.set()
    if proc.returncode:
        raise SystemExit(stderr[-3000:])
    summary = json.loads(stdout.strip().splitlines()[-1])
    c, ts = summary["counts"], summary["timings_s"]
    kept_after_filters = c["documents_in"] - sum(v for k, v in c["removed"].items()
                                                 if k not in ("exact_dup", "near_dup") and not k.startswith("boilerplate"))
    tokens = summary["tokens"]["train"] + summary["tokens"]["val"]
    wb = work_bytes(out)
    result = {
        "bench": f"prep_scale_{docs}_docs_{workers}_workers", "value": round(c["records_in"] / wall, 1),
        "unit": "docs/s (whole prep, wall)", "reference": None, "ratio": None,
        "docs": c["records_in"], "input_mb": round(input_bytes / 1e6, 1), "wall_s": round(wall, 1),
        "timings_s": ts,
        "docs_per_s": {"clean+filter": round(c["records_in"] / ts["clean"], 1),
                       "dedup": round(kept_after_filters / max(ts["dedup"], 1e-9), 1),
                       "boilerplate": round(kept_after_filters / max(ts["boilerplate"], 1e-9), 1),
                       "tokenize": round(c["documents_kept"] / max(ts["tokenize"], 1e-9), 1)},
        "tokens_per_s_tokenize": round(tokens / max(ts["tokenize"], 1e-9)),
        "peak_rss": mem.by_kind(),
        "work_bytes_per_doc": {k: round(v / c["records_in"], 1) for k, v in sorted(wb.items())},
        "work_bytes_per_doc_total": round(sum(v for k, v in wb.items() if k != "shards (output)") / c["records_in"], 1),
        "counts": {k: c[k] for k in ("documents_kept", "removed", "quarantined", "edits", "near_dup_pairs", "boilerplate_keys")},
        "planted": truth["planted"], "generate_s": round(gen_s, 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, nargs="+", default=[20000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="work here and keep it (default: a temp dir, removed)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kiln-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for n in args.docs:
            run(n, args.workers, root)
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)])


if __name__ == "__main__":
    main()
