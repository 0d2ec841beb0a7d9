"""Training throughput: `kiln train`'s step vs a minimal plain-PyTorch loop, and MFU vs the matmul peak.

CPU (default): configs/train/cpu-bench.yaml (GPT-2 style 6L/6H/384d, ctx 256, vocab 8192,
batch 8, fp32, 1 process). Kiln's step (sampler -> batch, lr, DeepSpeed engine step) and
the plain loop's step alternate, so load from a shared machine hits both sides alike.
GPU (--gpu, or automatically when CUDA is present): 350m and 1.3b (bf16, ZeRO-1) vs a
plain compiled bf16 loop, MFU against the GPU's bf16 spec and measured peak.

    PYTHONPATH=. DS_ACCELERATOR=cpu python bench/train_throughput.py --steps 12

Prints JSON lines {"bench", "value", "unit", "reference", "ratio"}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.model.flops import flops_per_token  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.train import time_matmul_peak  # noqa: E402


def emit(bench: str, value: float, unit: str, reference: float | None = None) -> None:
    ratio = value / reference if reference else None
    print(json.dumps({"bench": bench, "value": round(value, 4), "unit": unit,
                      "reference": round(reference, 4) if reference else None,
                      "ratio": round(ratio, 4) if ratio else None}), flush=True)


def fake_data(cfg, work: Path):
    """A learnable fake corpus (tests/factories.py) read through Kiln's sampler. Both loops train
    on the same kind of tokens: on CPU a step on uniformly random tokens was measured ~35% slower
    than on corpus-like tokens, which would bias the comparison."""
    from pipeline.data.sampler import TrainData
    from tests.factories import fake_corpus

    corpus = fake_corpus(work / "corpus", vocab_size=cfg.model.vocab_size, train_docs=3000, val_docs=10)
    cfg.data.paths = [str(corpus)]
    return TrainData(cfg.data, cfg.model.block_size, cfg.train.seed)


class PlainLoop:
    """The simplest correct loop: AdamW, grad clipping, same batches; one call = one step."""

    def __init__(self, cfg, data, device: str, bf16: bool, compile_: bool):
        torch.manual_seed(0)
        self.model = GPT(cfg.model).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                     fused=device == "cuda")
        self.fwd = torch.compile(self.model) if compile_ else self.model
        self.device, self.bf16, self.data, self.i = device, bf16, data, 0
        self.batch = cfg.train.micro_batch_size

    def __call__(self) -> None:
        x, y = self.data.train.batch(self.i * self.batch, self.batch)
        self.i += 1
        x, y = x.to(self.device), y.to(self.device)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class KilnStep:
    """What one iteration of `pipeline.train.train` does: sample index -> batch, lr, Engine.train_step."""

    def __init__(self, cfg, data):
        from pipeline.data.sampler import rank_slice
        from pipeline.parallel.engine import Engine, lr_at
        from pipeline.parallel.topology import init_distributed, make_layout

        init_distributed()
        self.layout = make_layout(cfg)
        self.data = data
        self.engine = Engine(cfg, self.layout)
        self.cfg, self.step, self.lr_at, self.rank_slice = cfg, 0, lr_at, rank_slice

    def __call__(self) -> None:
        t = self.cfg.train
        g = t.micro_batch_size * self.engine.accum * self.layout.dp
        self.engine.set_lr(self.lr_at(self.step, self.cfg))
        batches = [self.data.train.batch(s, c) for s, c in
                   self.rank_slice(self.step * g, g, self.layout.dp, self.layout.dp_rank, t.micro_batch_size)]
        self.engine.train_step(batches)
        self.step += 1


def interleaved(a, b, steps: int, sync) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median (wall s, process CPU s) per step of a and b, alternating a-b, b-a, ... so load
    changes and which-one-runs-second effects hit both alike. CPU seconds are the steadier
    figure on a shared machine: time spent descheduled does not count."""
    times: dict = {a: [], b: []}
    for i in range(steps + 2):
        for fn in ((a, b) if i % 2 == 0 else (b, a)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if i >= 2:  # warm-up
                times[fn].append((time.perf_counter() - t0, time.process_time() - c0))
    med = {fn: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for fn, v in times.items()}
    return med[a], med[b]


def timed(fn, steps: int, sync) -> float:
    """Median seconds per step after 3 warm-up steps (compilation happens there)."""
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_bench(steps: int) -> None:
    cfg = load_config("train", ROOT / "configs/train/cpu-bench.yaml")
    fpt, tokens = flops_per_token(cfg.model), cfg.train.micro_batch_size * cfg.model.block_size
    peak = _fresh_peak()  # measured in this run, not the cached value train() uses
    emit("cpu_fp32_matmul_peak", peak / 1e9, "GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_data(cfg, Path(tmp))
        (w_plain, c_plain), (w_kiln, c_kiln) = interleaved(PlainLoop(cfg, data, "cpu", False, False),
                                                           KilnStep(cfg, data), steps, lambda: None)
    plain, kiln = tokens / w_plain, tokens / w_kiln
    emit("cpu_plain_pytorch_tokens_per_s", plain, "tokens/s")
    emit("cpu_kiln_train_tokens_per_s", kiln, "tokens/s", plain)
    emit("cpu_kiln_train_tokens_per_cpu_s", tokens / c_kiln, "tokens/CPU-s", tokens / c_plain)
    emit("cpu_kiln_train_mfu_vs_measured_peak", fpt * kiln / peak, "fraction")
    emit("cpu_plain_pytorch_mfu_vs_measured_peak", fpt * plain / peak, "fraction")


def _fresh_peak(device: str = "cpu", dtype=torch.float32, n: int = 1024) -> float:
    return time_matmul_peak(dtype, n, device, repeats=8)


def gpu_bench(steps: int, models: list[str]) -> None:
    from pipeline.plan import gpu_peak_flops

    spec = gpu_peak_flops(torch.cuda.get_device_name())
    measured = _fresh_peak("cuda", torch.bfloat16, 8192)
    emit("gpu_bf16_matmul_peak", measured / 1e12, "TFLOP/s", spec / 1e12 if spec else None)
    for model in models:
        cfg = load_config("train", ROOT / "configs/model" / f"{model}.yaml",
                          ["model.vocab_size=50304", "train.micro_batch_size=8", "train.precision=bf16",
                           "parallel.zero_stage=1", "tracking.enabled=false", "train.warmup_steps=0",
                           "train.compile=true"])
        fpt, tokens = flops_per_token(cfg.model), cfg.train.micro_batch_size * cfg.model.block_size
        # one after the other: a GPU is not shared, and two 1.3b models with Adam do not fit side by side
        with tempfile.TemporaryDirectory() as tmp:
            data = fake_data(cfg, Path(tmp))
            t_plain = timed(PlainLoop(cfg, data, "cuda", True, True), steps, torch.cuda.synchronize)
            torch.cuda.empty_cache()
            t_kiln = timed(KilnStep(cfg, data), steps, torch.cuda.synchronize)
        plain, kiln = tokens / t_plain, tokens / t_kiln
        emit(f"gpu_{model}_plain_compiled_tokens_per_s", plain, "tokens/s")
        emit(f"gpu_{model}_kiln_train_tokens_per_s", kiln, "tokens/s", plain)
        if spec:
            emit(f"gpu_{model}_kiln_train_mfu_vs_spec", fpt * kiln / spec, "fraction")
        emit(f"gpu_{model}_kiln_train_mfu_vs_measured_peak", fpt * kiln / measured, "fraction")
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--gpu", action="store_true", help="GPU bench (default when CUDA is present)")
    parser.add_argument("--models", default="350m,1.3b")
    args = parser.parse_args()
    if args.gpu or torch.cuda.is_available():
        gpu_bench(args.steps, args.models.split(","))
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        cpu_bench(args.steps)


if __name__ == "__main__":
    main()
