"""One part of the GPU benchmark in a process of its own (bench/gpu.py starts it): the matmul peak, or one
contender at one model size. Prints one JSON line per figure the moment it exists; an error becomes a line
{"bench", "error"}, never a lost run.

    python -m bench.gpu_contender peak [--dry-run]
    python -m bench.gpu_contender 1.3b kiln_train [--dry-run] [--steps N] [--peak-tflops X]

The contenders (the same model shape, seed and batches; each alone on the GPU):
    kiln_train         Kiln's `train` step (sampler, lr, DeepSpeed ZeRO-1 bf16 engine, train.compile=blocks)
    kiln_gpt_compiled  Kiln's GPT, blocks compiled, in nanoGPT's plain loop: the bar
    nanogpt_compiled   nanoGPT's own GPT (bench/anchors/nanogpt), blocks compiled, in the same loop
Each reports its build + compile time, tokens/s (median step), MFU, peak memory and its mean training loss
over the last steps, which bench/gpu.py compares between contenders (a fast wrong step cannot pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name: (model config, T, B); the dry run's tiny model stands in for the first size asked
MODELS = {"1.3b": ("1.3b", 2048, 8), "124m": ("125m", 1024, 16)}
DRY_MODEL = ("tiny", 64, 2)
CONTENDERS = ("kiln_train", "kiln_gpt_compiled", "nanogpt_compiled")
LOSS_STEPS = 3  # the loss compared is the mean of the last this many steps


def one_line(e: BaseException | str) -> str:
    if isinstance(e, str):
        return e
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def error(bench: str, e: BaseException | str) -> dict:
    """Print one JSON line naming the figure and the error (a traceback goes to stderr); return it."""
    if isinstance(e, BaseException):
        traceback.print_exception(e, file=sys.stderr)
    record = {"bench": bench, "error": one_line(e)}
    print(json.dumps(record), flush=True)
    return record


def prefix(model: str, dry: bool) -> str:
    return "gpu_tiny" if dry else f"gpu_{model}"


def train_config(model: str, dry: bool):
    from pipeline.config import load_config

    name, t, b = DRY_MODEL if dry else MODELS[model]
    sets = [f"model.block_size={t}", f"train.micro_batch_size={b}", "train.grad_accum=1", "parallel.tp=1",
            "parallel.pp=1", "parallel.zero_stage=1", "tracking.enabled=false", "train.warmup_steps=0",
            f"model.vocab_size={8192 if dry else 50304}", f"train.precision={'fp32' if dry else 'bf16'}",
            f"train.compile={'off' if dry else 'blocks'}"]
    return load_config("train", ROOT / "configs/model" / f"{name}.yaml", sets)


def measure_peak(dry: bool) -> None:
    """The machine, and the bf16 matmul peak (fp32 on CPU in the dry run) against the spec."""
    import torch

    from bench.train_throughput import emit
    from pipeline.device import time_matmul_peak
    from pipeline.plan import gpu_peak_flops

    if dry:
        info = {"device": "cpu (dry run)", "torch": torch.__version__}
        print(json.dumps({"machine": info}), flush=True)
        emit("gpu_matmul_peak", time_matmul_peak(torch.float32, 1024, "cpu", repeats=3) / 1e12, "TFLOP/s",
             note="dry run: CPU fp32")
        return
    p = torch.cuda.get_device_properties(0)
    info = {"device": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps({"machine": info}), flush=True)
    spec = gpu_peak_flops(p.name)
    emit("gpu_matmul_peak", time_matmul_peak(torch.bfloat16, 8192, "cuda", repeats=10) / 1e12, "TFLOP/s",
         spec / 1e12 if spec else None, note="bf16 8192^3 matmul; reference: the bf16 dense spec")


def build(contender: str, cfg, data, dry: bool):
    """The contender as a callable that runs one training step and keeps that step's loss (`.loss`)."""
    from bench.train_throughput import KilnStep, kiln_gpt_loop, nanogpt_loop

    device, backend = ("cpu", "eager") if dry else ("cuda", "inductor")  # dry: dynamo traces, no codegen
    if contender == "kiln_train":
        return KilnStep(cfg, data)
    make = {"kiln_gpt_compiled": kiln_gpt_loop, "nanogpt_compiled": nanogpt_loop}[contender]
    return make(cfg, data, device, bf16=not dry, compile_=backend)


def measure_contender(model: str, contender: str, dry: bool, steps: int, peak_tflops: float) -> None:
    """Build and warm (compile) one contender, time `steps` steps; one JSON line per figure, as each exists."""
    import torch

    from bench.train_throughput import emit, fake_data, interleaved
    from pipeline.model.flops import flops_per_token
    from pipeline.plan import gpu_peak_flops

    sync = (lambda: None) if dry else torch.cuda.synchronize
    cfg = train_config(model, dry)
    fpt, tokens = flops_per_token(cfg.model), cfg.train.micro_batch_size * cfg.model.block_size
    spec = None if dry else gpu_peak_flops(torch.cuda.get_device_name())
    name = f"{prefix(model, dry)}_{contender}"
    losses = []
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_data(cfg, Path(tmp))
        t0 = time.perf_counter()
        fn = build(contender, cfg, data, dry)

        def step() -> None:
            fn()
            losses.append(fn.loss)  # a device tensor: read once at the end, no sync per step

        (wall, _, _, _), = interleaved([step], steps, sync, warmup_done=lambda: emit(
            f"{name}_build_and_compile_s", time.perf_counter() - t0, "s", note="build + 2 warm-up steps"))
    speed = tokens / wall
    emit(f"{name}_tokens_per_s", speed, "tokens/s", note=f"median of {steps} steps, B={cfg.train.micro_batch_size} "
         f"T={cfg.model.block_size}")
    if spec:
        emit(f"{name}_mfu_vs_spec", fpt * speed / spec, "fraction")
    if peak_tflops > 0:  # 0: the peak measurement failed (its error line says why)
        emit(f"{name}_mfu_vs_measured_peak", fpt * speed / (peak_tflops * 1e12), "fraction")
    if not dry:
        emit(f"{name}_peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GiB",
             note="the process's peak allocation: weights, optimizer, grads and the largest step")
    last = [float(x) for x in losses[-LOSS_STEPS:]]
    emit(f"{name}_loss", sum(last) / len(last), "nats/token", first=round(float(losses[0]), 4),
         note=f"mean training loss of steps {len(losses) - len(last) + 1}-{len(losses)} (same seed and batches "
              "for every contender)")
    print(json.dumps({"distributions": loaded_distributions()}), flush=True)


def loaded_distributions() -> list[str]:
    """The installed distributions whose modules this process has imported."""
    import importlib.metadata as md

    from bench import gpu_wheels

    owners = md.packages_distributions()
    tops = {m.split(".")[0] for m in list(sys.modules)}
    return sorted({gpu_wheels.norm(d) for t in tops for d in owners.get(t, ())})


def hide_unprovided() -> None:
    """The dry run's stand-in for the bare GPU image: modules of installed distributions that are neither
    in the image nor among the wheels become unfindable, as they are there, so a hard import fails and
    an optional one (DeepSpeed's `try: import mlflow`, torch's "is dill there?") takes the image's path."""
    import importlib.metadata as md
    from importlib.machinery import PathFinder

    from bench import gpu_wheels

    provided = {gpu_wheels.norm(n) for n in gpu_wheels.NEEDS} | gpu_wheels.image_closure()
    owners = md.packages_distributions()
    provided |= {gpu_wheels.norm(d) for d in owners.get("pipeline", ())}  # Kiln itself
    hidden = {top for top, dists in owners.items() if not {gpu_wheels.norm(d) for d in dists} & provided}

    class Finder(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            return None if name.partition(".")[0] in hidden else super().find_spec(name, path, target)

    sys.meta_path[:] = [Finder if f is PathFinder else f for f in sys.meta_path]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_contender")
    ap.add_argument("model", help="peak, or a model size: " + ", ".join(MODELS))
    ap.add_argument("contender", nargs="?", choices=CONTENDERS)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--site", type=Path, help="the folder bench/gpu_wheels.py installed into")
    args = ap.parse_args(argv)
    if args.site:  # bench/gpu_wheels.py: what the image lacks after its own packages (never shadowing them),
        from bench.gpu_wheels import over  # what it has in a version another needed one refuses before them

        sys.path.append(str(args.site))
        sys.path.insert(0, str(over(args.site)))
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
        hide_unprovided()
    name = "gpu_matmul_peak" if args.model == "peak" else f"{prefix(args.model, args.dry_run)}_{args.contender}"
    try:
        if args.model == "peak":
            measure_peak(args.dry_run)
        else:
            measure_contender(args.model, args.contender, args.dry_run, args.steps, args.peak_tflops)
    except Exception as e:  # noqa: BLE001 - the parent reads the line and goes on with the next part
        error(name, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
