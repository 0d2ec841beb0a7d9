"""Training throughput on CPU: `kiln train`'s step vs nanoGPT's own model and loop, and MFU.

configs/train/cpu-bench.yaml (GPT-2 style 6L/6H/384d, ctx 256, vocab 8192, batch 8, fp32,
1 process). Kiln's step (sampler -> batch, lr, DeepSpeed engine step) and nanoGPT's (its
`GPT` from bench/anchors/nanogpt, its `configure_optimizers` AdamW, its train.py step: forward,
backward, clip, step, zero_grad) alternate on the same batches, so load from a shared machine
hits both alike. The bar: Kiln tokens/s >= nanoGPT's (ratio >= 1.0). The GPU counterpart is
bench/gpu.py (`python -m bench gpu`).

    PYTHONPATH=. DS_ACCELERATOR=cpu python bench/train_throughput.py --steps 12

Prints JSON lines {"bench", "value", "unit", "reference", "ratio"} (+ "note" where one helps).
"""

from __future__ import annotations

import argparse
import contextlib
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
from pipeline.device import time_matmul_peak  # noqa: E402
from pipeline.families import family  # noqa: E402
from pipeline.model.flops import flops_per_token  # noqa: E402
from pipeline.model.gpt import GPT, Block  # noqa: E402
from pipeline.schedule import lr_of, schedule_of  # noqa: E402


def emit(bench: str, value: float, unit: str, reference: float | None = None, **extra) -> dict:
    """Print (and return) one figure as a JSON line; `extra` adds fields (a note, the memory...)."""
    ratio = value / reference if reference else None
    record = {"bench": bench, "value": round(value, 4), "unit": unit,
              "reference": round(reference, 4) if reference else None,
              "ratio": round(ratio, 4) if ratio else None, **extra}
    print(json.dumps(record), flush=True)
    return record


def fake_data(cfg, work: Path):
    """A learnable fake corpus (tests/factories.py) read through Kiln's sampler. Both loops train
    on the same kind of tokens: on CPU a step on uniformly random tokens was measured ~35% slower
    than on corpus-like tokens, which would bias the comparison."""
    from data_prep.synthetic import fake_corpus
    from pipeline.data.sampler import TrainData

    corpus = fake_corpus(work / "corpus", vocab_size=cfg.model.vocab_size, train_docs=3000, val_docs=10)
    cfg.data.paths = [str(corpus)]
    return TrainData(cfg.data, cfg.model.block_size, cfg.train.seed)


def nanogpt_model(m, bias: bool | None = None):
    """nanoGPT's own GPT (bench/anchors/nanogpt) at Kiln's model shape; bias as in Kiln's style unless given."""
    from bench.anchors.nanogpt.model import GPT as NanoGPT
    from bench.anchors.nanogpt.model import GPTConfig

    conf = GPTConfig(block_size=m.block_size, vocab_size=m.vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                     n_embd=m.n_embd, dropout=m.dropout, bias=family(m).bias if bias is None else bias)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        return NanoGPT(conf)


def differences(m) -> list[str]:
    """What still differs between Kiln's GPT at config `m` and nanoGPT's at the same shape."""
    spec = family(m)
    out = ["attention input: q, k, v as three Linear (Kiln) vs one fused c_attn (nanoGPT); same weights, FLOPs"]
    same = (spec.norm, spec.mlp, spec.positions) == ("layernorm", "gelu", "learned")
    if same:
        out.append("MLP GELU: tanh approximation (Kiln) vs exact erf (nanoGPT's nn.GELU())")
    else:
        out.append(f"Kiln {spec.name} family ({spec.norm}, {spec.positions} positions, {spec.mlp} MLP, "
                   f"{'biases' if spec.bias else 'no biases'}) vs nanoGPT GPT-2 style (LayerNorm, learned "
                   "positions, GELU)")
    if not m.tie_embeddings or m.n_kv_heads not in (None, m.n_head):
        out.append("Kiln config unties the head or uses grouped-query attention; nanoGPT ties, full heads")
    return out


class Loop:
    """A plain loop as nanoGPT's train.py runs it; one call = one step on the next batch: forward
    (bf16 autocast when asked), backward, clip the grad norm, AdamW step, zero_grad(set_to_none); the step's
    loss stays on the device (`.loss`). `compile_` (True or a backend name) compiles each of `blocks` on its
    own, as Kiln's `train.compile: blocks` does."""

    def __init__(self, model, optimizer, cfg, data, device: str, bf16: bool, compile_: bool | str, blocks=()):
        self.model, self.opt, self.loss = model, optimizer, None
        for block in blocks if compile_ else ():
            block.compile(backend=compile_ if isinstance(compile_, str) else "inductor")
        self.device, self.bf16, self.data, self.i = device, bf16, data, 0
        self.batch, self.clip = cfg.train.micro_batch_size, cfg.train.grad_clip

    def __call__(self) -> None:
        x, y = self.data.train.batch(self.i * self.batch, self.batch)
        self.i += 1
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.model(x, y)
        loss.backward()
        self.loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def nanogpt_loop(cfg, data, device: str = "cpu", bf16: bool = False, compile_: bool | str = False,
                 bias: bool | None = None) -> Loop:
    """nanoGPT's model with its own `configure_optimizers` (AdamW, fused on CUDA), seeded like Kiln."""
    torch.manual_seed(cfg.train.seed)
    model = nanogpt_model(cfg.model, bias).to(device)
    t = cfg.train
    with contextlib.redirect_stdout(sys.stderr):
        opt = model.configure_optimizers(t.weight_decay, t.lr, (t.beta1, t.beta2), device)
    return Loop(model, opt, cfg, data, device, bf16, compile_, model.transformer.h)


def kiln_gpt_loop(cfg, data, device: str = "cpu", bf16: bool = False, compile_: bool | str = False) -> Loop:
    """Kiln's own GPT in the same plain loop (torch AdamW over Kiln's decay groups): same model as `train`."""
    from pipeline.parallel.optimizer import param_groups

    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                            fused=device == "cuda")
    return Loop(model, opt, cfg, data, device, bf16, compile_, [b for b in model.modules() if isinstance(b, Block)])


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class KilnStep:
    """What one iteration of `pipeline.train.train` does: sample index -> batch, lr, Engine.train_step."""

    def __init__(self, cfg, data):
        from pipeline.data.sampler import rank_slice
        from pipeline.parallel.engine import Engine
        from pipeline.parallel.topology import init_distributed, make_layout

        init_distributed()
        self.layout = make_layout(cfg)
        self.data = data
        self.engine = Engine(cfg, self.layout)
        self.cfg, self.step, self.schedule, self.rank_slice, self.loss = cfg, 0, schedule_of(cfg.train.model_dump()), rank_slice, None

    def __call__(self) -> None:
        t = self.cfg.train
        g = t.micro_batch_size * self.engine.accum * self.layout.dp
        self.engine.set_lr(lr_of(self.step, self.schedule))
        batches = [self.data.train.batch(s, c) for s, c in
                   self.rank_slice(self.step * g, g, self.layout.dp, self.layout.dp_rank, t.micro_batch_size)]
        self.loss, _ = self.engine.train_step(batches)
        self.step += 1


def interleaved(fns: list, steps: int, sync, transient=None, warmup_done=None) -> list[tuple[float, float, int, float]]:
    """Per fn: median wall s and process CPU s per step, its largest transient memory (bytes, from
    `transient`, a context manager yielding a callable read after the step; 0 without one), and its
    fastest step's wall s (the least disturbed by other jobs). The fns take
    turns, the order reversed every round (a-b, b-a, ...), so load changes and which-one-runs-second
    effects hit all alike; 2 warm-up rounds are dropped (`warmup_done` is called after them). CPU seconds
    are the steadier figure on a shared machine: time spent descheduled does not count."""
    times: list[list] = [[] for _ in fns]
    for i in range(steps + 2):
        if i == 2 and warmup_done:
            sync()
            warmup_done()
        for k in (range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))):
            with transient() if transient else contextlib.nullcontext(lambda: 0) as extra:
                t0, c0 = time.perf_counter(), time.process_time()
                fns[k]()
                sync()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if i >= 2:  # warm-up
                times[k].append((wall, cpu, extra()))
    return [(statistics.median(w for w, _, _ in v), statistics.median(c for _, c, _ in v), max(m for _, _, m in v),
             min(w for w, _, _ in v)) for v in times]


def cpu_bench(steps: int) -> None:
    cfg = load_config("train", ROOT / "configs/train/cpu-bench.yaml")
    fpt, tokens = flops_per_token(cfg.model), cfg.train.micro_batch_size * cfg.model.block_size
    before = _fresh_peak()  # measured in this run, not the cached value train() uses
    with tempfile.TemporaryDirectory() as tmp:
        data = fake_data(cfg, Path(tmp))
        nano, kiln_step = nanogpt_loop(cfg, data), KilnStep(cfg, data)
        params = f"parameters: Kiln {n_params(kiln_step.engine.engine.module):,}, nanoGPT {n_params(nano.model):,}"
        (w_nano, c_nano, _, b_nano), (w_kiln, c_kiln, _, b_kiln) = interleaved([nano, kiln_step], steps, lambda: None)
    ref, kiln = tokens / w_nano, tokens / w_kiln
    peak = max(before, _fresh_peak())  # best of before and after: load from other jobs drifts during the run
    emit("cpu_fp32_matmul_peak", peak / 1e9, "GFLOP/s", note="best of one measurement before and one after")
    emit("cpu_nanogpt_tokens_per_s", ref, "tokens/s", note="nanoGPT's GPT + configure_optimizers, its train.py step")
    emit("cpu_kiln_train_tokens_per_s", kiln, "tokens/s", ref,
         note="bar: ratio >= 1.0; " + params + "; differences: " + "; ".join(differences(cfg.model)))
    emit("cpu_kiln_train_tokens_per_cpu_s", tokens / c_kiln, "tokens/CPU-s", tokens / c_nano)
    emit("cpu_kiln_train_tokens_per_s_fastest_step", tokens / b_kiln, "tokens/s", tokens / b_nano,
         note="each side's fastest step: the figure least disturbed by other jobs on a shared machine")
    emit("cpu_kiln_train_mfu_vs_measured_peak", fpt * kiln / peak, "fraction")
    emit("cpu_nanogpt_mfu_vs_measured_peak", fpt * ref / peak, "fraction")
    emit("cpu_load_average_1min", os.getloadavg()[0], "runnable tasks", note="other jobs on the machine during the run")


def _fresh_peak(device: str = "cpu", dtype=torch.float32, n: int = 1024) -> float:
    return time_matmul_peak(dtype, n, device, repeats=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cpu_bench(args.steps)


if __name__ == "__main__":
    main()
