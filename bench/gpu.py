"""`python -m bench gpu` (`make bench-gpu`): Kiln's training step vs compiled plain PyTorch on one GPU.

One command on a bare CUDA machine (Python 3.12, torch, no network), made to keep its figures inside one
10-minute call: it installs what Kiln's training path needs and the image lacks from the wheels
`make gpu-wheels` prepared (bench/gpu_wheels.py; nothing the image already has in a usable version), then
runs, each in a process of its own (bench/gpu_contender.py), the bf16 matmul peak and then, 1.3B first
(T=2048, B=8) and 124M after (T=1024, B=16), three contenders: Kiln's `train` step, Kiln's GPT compiled in
nanoGPT's plain loop (the bar: Kiln >= 1.04x it) and nanoGPT's own GPT compiled. Every model compiles
per block (regional), so a cold compile costs seconds. Each figure is printed and appended to
bench/results/gpu-<UTC time>.jsonl the moment it exists, so a run stopped at any point keeps what it
measured; a part that overruns its share of --budget-s is stopped and reported. Once two contenders of a
size have run, their speeds are compared and so are their training losses on the same batches: Kiln's
loss outside --loss-tolerance of the plain loop's is an error (exit 1): a fast wrong step cannot pass.

    python -m bench gpu --dry-run   # everything but CUDA, on CPU: tiny model, wheel folder checked
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_wheels  # noqa: E402
from bench.gpu_contender import CONTENDERS, MODELS, error, prefix  # noqa: E402

# each part's weight: it may use (its weight / the weights still to run) of the time left when it starts
WEIGHTS = {"peak": 0.3, "1.3b": 1.0, "124m": 0.5}
PEAK_LIMIT_S = 60
LOSS_TOLERANCE = 0.03  # relative; bf16 mixed precision, a dozen steps on the same batches and seed


class Results:
    """The results file, one JSON line at a time, flushed as each arrives; also kept in memory."""

    def __init__(self, path: Path, header: dict, dry: bool = False):
        self.path, self.records, self.dry = path, [], dry
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a")
        self._lock = threading.Lock()
        self.write({"run": header})

    def write(self, record: dict) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if "bench" in record:
                self.records.append(record)

    def add(self, record: dict) -> None:
        """A record made here (not read from a part): printed too."""
        print(json.dumps(record), flush=True)
        self.write(record)

    def fail(self, bench: str, msg: str) -> None:
        self.add({"bench": bench, "error": msg})

    def get(self, bench: str) -> dict | None:
        return next((r for r in self.records if r.get("bench") == bench and "value" in r), None)

    def value(self, bench: str) -> float | None:
        return (self.get(bench) or {}).get("value")

    def close(self, summary: dict) -> None:
        self.write({"summary": summary})
        self._file.close()


def run_part(name: str, cmd: list[str], limit: float, results: Results, extra: dict) -> None:
    """Run one part's process for at most `limit` s; each JSON line it prints is passed on at once."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if "bench" in record:
                print(line, end="", flush=True)
            else:
                extra.update(record)
            if "bench" in record or "machine" in record:
                results.write(record)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        reader.join(timeout=5)
        results.fail(name, f"stopped after {limit:.0f} s (its share of the time budget)")
        return
    reader.join(timeout=5)
    if proc.returncode and not any(r.get("bench", "").startswith(name) and "error" in r for r in results.records):
        results.fail(name, f"process exited {proc.returncode}")


def compare(size: str, ran: str, results: Results, tolerance: float = LOSS_TOLERANCE) -> None:
    """Once `ran` has run: Kiln's step against each plain loop of the same size that has run with it: speed, and
    the training loss on the same batches, an error unless Kiln's final loss is within `tolerance` of the
    reference's and it fell by at least half as much from the first step (a step that does not learn)."""
    p = prefix(size, results.dry)
    kiln = {"speed": results.value(f"{p}_kiln_train_tokens_per_s"), "loss": results.get(f"{p}_kiln_train_loss")}
    for ref in [c for c in CONTENDERS[1:] if ran in ("kiln_train", c)]:
        speed, loss = results.value(f"{p}_{ref}_tokens_per_s"), results.get(f"{p}_{ref}_loss")
        if kiln["speed"] and speed:
            bar = "bar: ratio >= 1.04" if ref == "kiln_gpt_compiled" else None
            results.add(record(f"{p}_kiln_train_vs_{ref}", kiln["speed"], "tokens/s", speed, bar))
        if not (kiln["loss"] and loss):
            continue
        k_last, r_last = kiln["loss"]["value"], loss["value"]
        k_drop, r_drop = kiln["loss"]["first"] - k_last, loss["first"] - r_last
        results.add(record(f"{p}_kiln_train_loss_vs_{ref}", k_last, "nats/token", r_last,
                           f"same seed and batches; must be within {tolerance:.0%} of the reference, and fall "
                           f"from the first step by at least half as much (Kiln {k_drop:.4f}, reference {r_drop:.4f})"))
        if not (abs(k_last / r_last - 1) <= tolerance and k_drop >= 0.5 * r_drop):  # NaN fails too
            results.fail(f"{p}_kiln_train_loss_check", f"Kiln's loss {k_last:.4f} (fell {k_drop:.4f}) against "
                         f"{ref}'s {r_last:.4f} (fell {r_drop:.4f}) after the same steps: outside {tolerance:.0%} "
                         "or learning less than half as fast")


def record(bench: str, value: float, unit: str, reference: float, note: str | None) -> dict:
    out = {"bench": bench, "value": round(value, 4), "unit": unit, "reference": round(reference, 4),
           "ratio": round(value / reference, 4)}
    return {**out, "note": note} if note else out


def schedule(models: list[str], dry: bool) -> list[tuple[str, str | None]]:
    """The parts in order: the peak, then each size's contenders (the dry run's tiny model stands in once)."""
    return [("peak", None)] + [(m, c) for m in (models[:1] if dry else models) for c in CONTENDERS]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="everything but CUDA, on CPU, tiny model")
    ap.add_argument("--wheels", type=Path, default=gpu_wheels.WHEELS, help="the folder `make gpu-wheels` wrote")
    ap.add_argument("--models", default="1.3b,124m", help="sizes in the order they run")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender (after 2 warm-up steps)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="hard limit for the whole run")
    ap.add_argument("--loss-tolerance", type=float, default=LOSS_TOLERANCE)
    ap.add_argument("--out", type=Path, help="default: bench/results/gpu[-dryrun]-<UTC time>.jsonl")
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    start = time.time()
    deadline = start + args.budget_s
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or ROOT / "bench/results" / f"gpu{'-dryrun' if args.dry_run else ''}-{stamp}.jsonl"
    from bench.__main__ import machine

    results = Results(out, {"command": "python -m bench gpu " + " ".join(argv), "machine": machine(),
                            "dry_run": args.dry_run, "budget_s": args.budget_s,
                            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, args.dry_run)
    extra: dict = {}
    try:
        if args.dry_run:
            problems = gpu_wheels.check(args.wheels)
            for p in problems:
                results.fail("gpu_wheels", p)
            extra["wheels"] = problems or "ok: pip would install every wheel offline on Python 3.12"
        else:
            extra["installed"] = gpu_wheels.install(args.wheels)
    except Exception as e:  # noqa: BLE001 - the measurements still say what they can
        results.add(error("gpu_wheels", e))
    results.write({"setup": dict(extra)})
    common = (["--dry-run"] if args.dry_run else []) + ["--steps", str(args.steps), "--site", str(gpu_wheels.SITE)]
    parts = schedule(models, args.dry_run)
    for i, (size, contender) in enumerate(parts):
        name = "gpu_matmul_peak" if size == "peak" else f"{prefix(size, args.dry_run)}_{contender}"
        left = deadline - time.time()
        if left < 20:
            results.fail(name, f"skipped: {left:.0f} s of the time budget left")
            continue
        weight = WEIGHTS[size]
        limit = left * weight / sum(WEIGHTS[s] for s, _ in parts[i:])
        limit = min(limit, PEAK_LIMIT_S) if size == "peak" else limit
        peak = ["--peak-tflops", str(results.value("gpu_matmul_peak") or 0.0)]
        cmd = [sys.executable, "-m", "bench.gpu_contender", size, *([contender] if contender else []), *common, *peak]
        run_part(name, cmd, max(limit, 10), results, extra)
        if contender:
            imported = extra.pop("distributions", None)
            if imported:
                results.write({"imported": {name: imported}})
            compare(size, contender, results, args.loss_tolerance)
    figures = [r for r in results.records if "error" not in r]
    errors = [r for r in results.records if "error" in r]
    results.close({"wall_s": round(time.time() - start, 1), "figures": len(figures), "errors": len(errors),
                   "machine": extra.get("machine")})
    print(f"wrote {out} ({len(figures)} figures, {len(errors)} errors, {time.time() - start:.0f} s)", file=sys.stderr)
    return 1 if errors or not figures else 0

