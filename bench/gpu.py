"""`python -m bench gpu` (`make bench-gpu`): Kiln's training step vs compiled plain PyTorch on one GPU.

One command on a bare CUDA machine (Python 3.12, torch, no network): it installs what Kiln's
training path needs from the wheels `make gpu-wheels` prepared (bench/gpu_wheels.py), then
measures, each model in its own process, three contenders taking turns step by step:
    kiln_train         Kiln's `train` step (sampler, lr, DeepSpeed ZeRO-1 bf16 engine, train.compile)
    kiln_gpt_compiled  Kiln's GPT, same config, torch.compile'd, in nanoGPT's plain loop: the bar
    nanogpt_compiled   nanoGPT's own GPT (bench/anchors/nanogpt) at the same shape, compiled
for 124m (T=1024, B=16) and 1.3b (T=2048, B=8), bf16, 1 GPU. Figures: tokens/s, MFU against the
bf16 dense spec and against a bf16 matmul peak measured in the same run, peak memory. Each
figure is guarded (a failure prints {"bench", "error"} and the others go on) and the whole run
keeps to --budget-s (default 450 s, under 8 minutes, compile and install included): a model
whose process overruns its share is stopped and reported. Everything lands in
bench/results/gpu-<UTC time>.json with the machine description; one JSON line per figure.

    python -m bench gpu --dry-run   # everything but CUDA, on CPU: tiny model, wheel folder checked
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import gpu_wheels  # noqa: E402

# name: (model config, T, B); the dry run's tiny model stands in for both
MODELS = {"124m": ("125m", 1024, 16), "1.3b": ("1.3b", 2048, 8)}
DRY_MODEL = ("tiny", 64, 2)
SHARES = {"peak": 0.1, "124m": 0.35, "1.3b": 1.0}  # of the time left when each part starts
CONTENDERS = ("kiln_train", "kiln_gpt_compiled", "nanogpt_compiled")


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def error(bench: str, e: BaseException | str) -> None:
    """One JSON line naming the figure and the error (the traceback goes to stderr)."""
    if isinstance(e, BaseException):
        traceback.print_exception(e, file=sys.stderr)
    print(json.dumps({"bench": bench, "error": e if isinstance(e, str) else one_line(e)}), flush=True)


def train_config(part: str, dry: bool):
    from pipeline.config import load_config

    name, t, b = DRY_MODEL if dry else MODELS[part]
    sets = [f"model.block_size={t}", f"train.micro_batch_size={b}", "train.grad_accum=1", "parallel.tp=1",
            "parallel.pp=1", "parallel.zero_stage=1", "tracking.enabled=false", "train.warmup_steps=0",
            f"model.vocab_size={8192 if dry else 50304}", f"train.precision={'fp32' if dry else 'bf16'}",
            f"train.compile={'false' if dry else 'true'}"]
    return load_config("train", ROOT / "configs/model" / f"{name}.yaml", sets)


@contextmanager
def cuda_transient():
    """Yields a reader of the bytes a step allocated above what was resident when it started."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    peak = [0]
    yield lambda: peak[0]
    peak[0] = torch.cuda.max_memory_allocated() - start


def measure_peak(dry: bool) -> None:
    """The machine, and the bf16 matmul peak (fp32 on CPU in the dry run) against the spec."""
    import torch

    from bench.train_throughput import emit
    from pipeline.plan import gpu_peak_flops
    from pipeline.train import time_matmul_peak

    if dry:
        info = {"device": "cpu (dry run)", "torch": torch.__version__}
        emit("gpu_matmul_peak", time_matmul_peak(torch.float32, 1024, "cpu", repeats=3) / 1e12, "TFLOP/s", note="dry run: CPU fp32")
    else:
        p = torch.cuda.get_device_properties(0)
        info = {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                "torch": torch.__version__, "cuda": torch.version.cuda}
        spec = gpu_peak_flops(p.name)
        emit("gpu_matmul_peak", time_matmul_peak(torch.bfloat16, 8192, "cuda", repeats=10) / 1e12, "TFLOP/s",
             spec / 1e12 if spec else None, note="bf16 8192^3 matmul; reference: the bf16 dense spec")
    print(json.dumps({"machine": info}), flush=True)


def free_memory(dry: bool) -> None:
    gc.collect()
    if not dry:
        import torch

        torch.cuda.empty_cache()


class Guarded:
    """A contender that, once a step fails (out of memory...), prints the error, lets go of its model and
    does nothing from then on, so the others' turns and figures go on."""

    def __init__(self, name: str, fn, dry: bool):
        self.name, self.fn, self.dry, self.failed = name, fn, dry, False

    def __call__(self) -> None:
        if self.failed:
            return
        try:
            self.fn()
        except Exception as e:  # noqa: BLE001
            self.failed, self.fn = True, None
            error(self.name, e)
            free_memory(self.dry)


def measure_model(part: str, dry: bool, steps: int, peak_tflops: float) -> None:
    """Build and warm (compile) each contender, then time them in turns; one JSON line per figure."""
    import torch

    from bench.train_throughput import KilnStep, emit, fake_data, interleaved, kiln_gpt_loop, nanogpt_loop
    from pipeline.model.flops import flops_per_token
    from pipeline.plan import gpu_peak_flops

    device = "cpu" if dry else "cuda"
    sync = (lambda: None) if dry else torch.cuda.synchronize
    used = (lambda: 0) if dry else torch.cuda.memory_allocated
    cfg = train_config(part, dry)
    compile_ = "eager" if dry else True  # the dry run traces with dynamo but skips inductor's codegen
    makers = {"kiln_train": lambda data: KilnStep(cfg, data),
              "kiln_gpt_compiled": lambda data: kiln_gpt_loop(cfg, data, device, not dry, compile_),
              "nanogpt_compiled": lambda data: nanogpt_loop(cfg, data, device, not dry, compile_)}
    fpt, tokens = flops_per_token(cfg.model), cfg.train.micro_batch_size * cfg.model.block_size
    spec = None if dry else gpu_peak_flops(torch.cuda.get_device_name())
    prefix = "gpu_tiny" if dry else f"gpu_{part}"
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_data(cfg, Path(tmp))
        built = {}
        for name, make in makers.items():
            try:
                before, t0 = used(), time.perf_counter()
                fn = make(data)
                for _ in range(2):  # compilation happens here
                    fn()
                sync()
                built[name] = (fn, used() - before)
                emit(f"{prefix}_{name}_build_and_compile_s", time.perf_counter() - t0, "s")
            except Exception as e:  # noqa: BLE001 - one contender's failure must not lose the others
                fn = None
                error(f"{prefix}_{name}", e)
                free_memory(dry)
        names = list(built)
        guarded = [Guarded(f"{prefix}_{n}", built[n][0], dry) for n in names]
        resident, built, fn = {n: r for n, (_, r) in built.items()}, None, None  # the Guarded hold the only refs
        timings = interleaved(guarded, steps, sync, None if dry else cuda_transient) if guarded else []
    speed = {n: tokens / wall for n, g, (wall, *_) in zip(names, guarded, timings, strict=True) if not g.failed}
    for n, (_, _, transient, _) in zip(names, timings, strict=True):
        if n not in speed:
            continue
        ref = speed.get("kiln_gpt_compiled") if n == "kiln_train" else None
        emit(f"{prefix}_{n}_tokens_per_s", speed[n], "tokens/s", ref,
             note="reference: Kiln's GPT compiled in a plain loop; bar ratio >= 1.04" if ref else None)
        if spec:
            emit(f"{prefix}_{n}_mfu_vs_spec", fpt * speed[n] / spec, "fraction")
        if peak_tflops > 0:  # 0: the peak measurement failed (its error line says why)
            emit(f"{prefix}_{n}_mfu_vs_measured_peak", fpt * speed[n] / (peak_tflops * 1e12), "fraction")
        if not dry:
            emit(f"{prefix}_{n}_peak_memory", (resident[n] + transient) / 2**30, "GiB",
                 note="resident after warm-up (weights, optimizer, grads) + largest step transient")
    if "kiln_train" in speed and "nanogpt_compiled" in speed:
        from bench.train_throughput import differences

        emit(f"{prefix}_kiln_train_vs_nanogpt", speed["kiln_train"], "tokens/s", speed["nanogpt_compiled"],
             note="differences: " + "; ".join(differences(cfg.model)))
    print(json.dumps({"distributions": loaded_distributions()}), flush=True)


def loaded_distributions() -> list[str]:
    """The installed distributions whose modules this process has imported."""
    import importlib.metadata as md

    owners = md.packages_distributions()
    tops = {m.split(".")[0] for m in list(sys.modules)}
    return sorted({gpu_wheels.norm(d) for t in tops for d in owners.get(t, ())})


def hide_unprovided() -> None:
    """The dry run's stand-in for the bare GPU image: modules of installed distributions that are neither
    in the image nor among the wheels become unfindable, as they are there, so a hard import fails and
    an optional one (DeepSpeed's `try: import mlflow`, torch's "is dill there?") takes the image's path."""
    import importlib.metadata as md
    from importlib.machinery import PathFinder

    provided = {gpu_wheels.norm(n) for n in gpu_wheels.NEEDS} | gpu_wheels.image_closure()
    owners = md.packages_distributions()
    provided |= {gpu_wheels.norm(d) for d in owners.get("pipeline", ())}  # Kiln itself
    hidden = {top for top, dists in owners.items() if not {gpu_wheels.norm(d) for d in dists} & provided}

    class Finder(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] in hidden else super().find_spec(name, path, target)

    sys.meta_path[:] = [Finder if f is PathFinder else f for f in sys.meta_path]


def child(argv: list[str]) -> None:
    """One part (peak or a model) in this process; errors become JSON lines, never a lost run."""
    ap = argparse.ArgumentParser()
    ap.add_argument("part")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
        hide_unprovided()
    try:
        if args.part == "peak":
            measure_peak(args.dry_run)
        else:
            measure_model(args.part, args.dry_run, args.steps, args.peak_tflops)
    except Exception as e:  # noqa: BLE001
        error(f"gpu_{args.part}", e)


def run_part(part: str, argv: list[str], deadline: float, records: list, extra: dict) -> None:
    """Run one part in a child process until its share of the time left; collect its JSON lines."""
    left = deadline - time.time()
    if left < 20:
        msg = f"skipped: {left:.0f} s of the time budget left"
        error(f"gpu_{part}", msg)
        records.append({"bench": f"gpu_{part}", "error": msg})
        return
    limit = left * SHARES[part] if part != "peak" else min(left * SHARES[part], 90)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(gpu_wheels.SITE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu", "--child", part, *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "bench" in record:
                print(line, end="", flush=True)
                records.append(record)
            elif isinstance(record, dict):
                extra.update(record)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(limit, 10))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        msg = f"stopped after {limit:.0f} s (its share of the time budget)"
        error(f"gpu_{part}", msg)
        records.append({"bench": f"gpu_{part}", "error": msg})
    reader.join(timeout=5)
    if proc.returncode and proc.returncode != -9:
        records.append({"bench": f"gpu_{part}", "error": f"process exited {proc.returncode}"})
        error(f"gpu_{part}", f"process exited {proc.returncode}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":
        child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="everything but CUDA, on CPU, tiny model")
    ap.add_argument("--wheels", type=Path, default=gpu_wheels.WHEELS, help="the folder `make gpu-wheels` wrote")
    ap.add_argument("--models", default="124m,1.3b")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender (after 2 warm-up rounds)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="hard limit for the whole run")
    ap.add_argument("--out", type=Path, help="default: bench/results/gpu[-dryrun]-<UTC time>.json")
    args = ap.parse_args(argv)
    start = time.time()
    deadline = start + args.budget_s
    records: list[dict] = []
    extra: dict = {}
    setup = {"wheels": str(args.wheels)}
    try:
        if args.dry_run:
            problems = gpu_wheels.check(args.wheels)
            setup["check"] = problems or "ok: pip would install every wheel offline on Python 3.12"
            for p in problems:
                error("gpu_wheels", p)
                records.append({"bench": "gpu_wheels", "error": p})
        else:
            setup["installed"] = gpu_wheels.install(args.wheels)
    except Exception as e:  # noqa: BLE001 - the measurements still say what they can
        error("gpu_wheels", e)
        records.append({"bench": "gpu_wheels", "error": one_line(e)})
    common = (["--dry-run"] if args.dry_run else []) + ["--steps", str(args.steps)]
    run_part("peak", common, deadline, records, extra)
    peak = next((r["value"] for r in records if r.get("bench") == "gpu_matmul_peak" and "value" in r), 0.0)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r} (known: {', '.join(MODELS)})")
    for m in models if not args.dry_run else models[:1]:  # the dry run's tiny model stands in once
        run_part(m, [*common, "--peak-tflops", str(peak)], deadline, records, extra)
        setup[f"{m}_imported"] = extra.pop("distributions", None)
    from bench.__main__ import machine

    out = args.out or ROOT / "bench/results" / f"gpu{'-dryrun' if args.dry_run else ''}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python -m bench gpu " + " ".join(argv), "machine": {**machine(), **extra.get("machine", {})},
           "dry_run": args.dry_run, "budget_s": args.budget_s, "wall_s": round(time.time() - start, 1),
           "setup": setup, "results": [r for r in records if "error" not in r],
           "errors": [r for r in records if "error" in r], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out} ({len(doc['results'])} figures, {len(doc['errors'])} errors, {doc['wall_s']} s)", file=sys.stderr)
    return 1 if doc["errors"] or not doc["results"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
