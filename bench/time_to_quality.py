"""Time to quality on CPU: how soon Kiln's `cpu-speedrun` recipe reaches the validation loss that nanoGPT's own
recipe ends at, both trained in one run on the same prepared corpus at the baby-GPT shape.

- Shape, fixed from outside for both: 6 layers, 6 heads, 384 wide, context 256, the corpus's vocabulary (8192 for
  the default corpus), micro-batch 8, no accumulation, 1 process, fp32 (`--n-layer` ... `--batch` change it).
- nanoGPT: its own model (bench/anchors/nanogpt, no biases and dropout 0 as its train.py defaults) with the recipe
  of its config/train_shakespeare_char.py: AdamW (its `configure_optimizers`) lr 1e-3, betas (0.9, 0.99), weight
  decay 0.1, 100 warm-up steps, cosine to 1e-4 at step N, grad clip 1.0; its train.py loop on random windows of
  the train split (torch.randint offsets, seed 1337). N = `--steps`.
- Kiln: `kiln train` (a subprocess) with `--recipe` (configs/train/cpu-speedrun.yaml) and `--set` overrides of
  the model shape, the batch (micro-batch, grad_accum 1, fp32), train.steps = `--kiln-steps-share` x N, the data
  path and cadences (log and checkpoint every eval interval, no in-run validation, tracking off) only: the
  recipe's optimizer, schedule and architecture options stand. Same shards, same tokens per step.
- One evaluator: pipeline/evaluate.py (`kiln eval`'s code path) on the first `--eval-windows` non-overlapping
  windows of the val split, for both: mean next-token cross-entropy and bits per byte. nanoGPT is scored every
  N/`--evals` steps as it trains; Kiln's checkpoints at the same steps are scored after its run.
- Clock: training steps only (see CLOCK); evaluation, checkpoint writing and start-up excluded for both.

Reports Kiln's training seconds and tokens to reach nanoGPT's final val loss (linear between the evals around the
crossing; also the first eval at or below it) as a fraction of nanoGPT's; bar: <= 0.6 with 60% of the steps.
Appends one JSON line (both curves, the machine) to RESULTS/time_to_quality.jsonl, writes
RESULTS/time_to_quality_N<steps>.png (val loss against training seconds).

Corpus: `--data DIR`, any prepared corpus (`kiln prep` output). By default the demo corpus (data_prep/demo_corpus.py:
the Python docs and installed packages' READMEs, the only natural text available offline; no download), prepped
once with configs/prep/demo.yaml at vocab_size 8192 into WORK/prep-8192.

    PYTHONPATH=. DS_ACCELERATOR=cpu python bench/time_to_quality.py --steps 300
    python -m bench time_to_quality --steps 1500 --data /path/to/prep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.__main__ import append_result, machine  # noqa: E402
from bench.moe_quality import kiln, prepped  # noqa: E402
from bench.train_throughput import nanogpt_loop  # noqa: E402
from pipeline.config import KilnError, RunConfig  # noqa: E402
from pipeline.data.corpus import PreparedCorpus  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402

RECIPE = ROOT / "configs/train/cpu-speedrun.yaml"
CLOCK = ("training steps only, from the first step's start: nanoGPT's steps timed by this script around each step "
         "(batch sampling, forward, backward, clip, AdamW step); Kiln's from its metrics.jsonl, logged every eval "
         "interval: each row's tokens / tokens_per_s, which kiln train measures over that interval's steps without "
         "validation or checkpoint writing. Evaluation, Kiln's checkpoint writing and both start-ups (model, "
         "optimizer, engine, data) are excluded; nanoGPT runs first, then Kiln, on the same threads.")


# ----------------------------------------------------------------------------- the one evaluator


class FullLogits(torch.nn.Module):
    """nanoGPT's GPT returns every position's logits only when given targets; `score` wants them all."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x, torch.zeros_like(x))[0], None


def score(model: torch.nn.Module, data: Path, windows: int, block: int) -> dict:
    """Both contenders' evaluator: `kiln eval`'s code path over the first `windows` non-overlapping windows of the
    val split. The model is left in train mode."""
    res = evaluate(model, data, "val", max_tokens=windows * block, block_size=block, stride=block, show=False)
    model.train()
    return {"val_loss": res["loss"], "val_bpb": res["bits_per_byte"]}


def time_to_reach(curve: list[dict], target: float, key: str) -> tuple[float | None, float | None]:
    """`key` (train_s or tokens) at which `curve` (evals in order) first gets to val_loss <= target: linear between
    the eval before and the first one at or below it, and that first eval's own value. (None, None) if never;
    the first eval's value twice if already the first one is."""
    before = None
    for point in curve:
        if point["val_loss"] <= target:
            if before is None:
                return point[key], point[key]
            frac = (before["val_loss"] - target) / (before["val_loss"] - point["val_loss"])
            return before[key] + frac * (point[key] - before[key]), point[key]
        before = point
    return None, None


# ----------------------------------------------------------------------------- nanoGPT with its own recipe


def nanogpt_lr(it: int, steps: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100) -> float:
    """nanoGPT train.py's get_lr with lr_decay_iters = max_iters = `steps`: linear warm-up, cosine to min_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > steps:
        return min_lr
    ratio = (it - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class RandomWindows:
    """nanoGPT's get_batch over the train split: `count` windows at torch.randint offsets (the global generator,
    seeded before the model is built, as in its train.py). Shaped as the throughput bench's Loop reads data."""

    def __init__(self, data: Path, block: int):
        self.stream, self.block = PreparedCorpus(data).stream("train"), block
        self.train = self

    def batch(self, _start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.stream) - self.block, (count,))
        rows = torch.stack([torch.from_numpy(self.stream.read(int(i), self.block + 1).astype("int64")) for i in ix])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def nanogpt_config(shape: dict, steps: int) -> RunConfig:
    """train_shakespeare_char.py's recipe at `shape` (what the throughput bench's Loop reads from a RunConfig)."""
    return RunConfig.model_validate({
        "model": {"style": "gpt2", "dropout": 0.0, **{k: v for k, v in shape.items() if k != "batch"}},
        "train": {"micro_batch_size": shape["batch"], "grad_accum": 1, "steps": steps, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 100, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0,
                  "precision": "fp32", "seed": 1337}})


def run_nanogpt(data: Path, shape: dict, steps: int, every: int, windows: int) -> list[dict]:
    cfg = nanogpt_config(shape, steps)
    loop = nanogpt_loop(cfg, RandomWindows(data, shape["block_size"]), bias=False)
    tokens_per_step = shape["batch"] * shape["block_size"]
    curve, train_s, since = [], 0.0, 0.0
    for it in range(steps):
        for group in loop.opt.param_groups:
            group["lr"] = nanogpt_lr(it, steps)
        t0 = time.perf_counter()
        loop()
        train_s += time.perf_counter() - t0
        if (it + 1) % every == 0 or it + 1 == steps:
            done = (it + 1) * tokens_per_step
            tps = (done - (curve[-1]["tokens"] if curve else 0)) / (train_s - since)
            curve.append({"step": it + 1, "tokens": done, "train_s": train_s, "tokens_per_s": tps,
                          "loss": float(loop.loss),
                          **score(FullLogits(loop.model), data, windows, shape["block_size"])})
            print(f"nanogpt step {it + 1}/{steps} {train_s:.1f}s val {curve[-1]['val_loss']:.4f}", file=sys.stderr)
            since = train_s
    return curve


# ----------------------------------------------------------------------------- Kiln with its recipe


def kiln_overrides(data: Path, shape: dict, steps: int, every: int, out: Path) -> list[str]:
    """The only keys set over the recipe: model shape, batch, steps, data, cadences (and where it writes)."""
    return [f"model.{k}={v}" for k, v in shape.items() if k != "batch"] + [
        f"train.micro_batch_size={shape['batch']}", "train.grad_accum=1", "train.precision=fp32",
        f"train.steps={steps}", f"data.paths=[{data}]", f"train.log_every={every}", "train.eval_every=0",
        f"checkpoint.every={every}", f"checkpoint.keep={steps // every + 2}", "tracking.enabled=false", f"out={out}"]


def kiln_snapshot(ckpt: Path) -> torch.nn.Module:
    """Kiln's GPT with a checkpoint's weights (consolidated from the run's weight slices)."""
    from pipeline.export import load_source
    from pipeline.model.gpt import GPT
    from pipeline.model.io import load_checked

    weights, cfg, _, _ = load_source(ckpt)
    model = GPT(cfg)
    load_checked(model, weights.to_dict(), ckpt)
    return model


def run_kiln(recipe: Path, data: Path, shape: dict, steps: int, every: int, windows: int, work: Path) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="kiln-", dir=work) as tmp:
        out = Path(tmp) / "run"
        sets = kiln_overrides(data, shape, steps, every, out)
        kiln("train", "--config", str(recipe), *[a for s in sets for a in ("--set", s)])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        tokens_per_step = shape["batch"] * shape["block_size"]
        curve, train_s, tokens = [], 0.0, 0
        for row in rows:
            if row["tokens"] != row["step"] * tokens_per_step:
                raise KilnError(f"{recipe}: Kiln trained {row['tokens']:,} tokens in {row['step']} steps, not "
                                f"{tokens_per_step:,} per step; the recipe must not change the batch")
            train_s += (row["tokens"] - tokens) / row["tokens_per_s"]
            tokens = row["tokens"]
            model = kiln_snapshot(out / "checkpoints" / f"step_{row['step']:07d}")
            curve.append({"step": row["step"], "tokens": tokens, "train_s": train_s,
                          "tokens_per_s": row["tokens_per_s"], "loss": row["loss"],
                          **score(model, data, windows, shape["block_size"])})
            print(f"kiln step {row['step']}/{steps} {train_s:.1f}s val {curve[-1]['val_loss']:.4f}", file=sys.stderr)
        return curve


# ----------------------------------------------------------------------------- the run


def check_data(data: Path, shape: dict, windows: int) -> None:
    have = (len(PreparedCorpus(data).stream("val")) - 1) // shape["block_size"]
    if have < windows:
        raise KilnError(f"{data / 'manifest.json'}: the val split holds {have} windows of {shape['block_size']} "
                        f"tokens; --eval-windows {windows} needs more (lower it or prep a larger val split)")


def report(nano: list[dict], kiln_curve: list[dict]) -> dict:
    target, nano_s, nano_tokens = nano[-1]["val_loss"], nano[-1]["train_s"], nano[-1]["tokens"]
    reach_s, first_s = time_to_reach(kiln_curve, target, "train_s")
    reach_tokens, first_tokens = time_to_reach(kiln_curve, target, "tokens")
    return {
        "bench": "time_to_quality.seconds_to_nanogpt_final_val_loss",
        "value": round(reach_s, 2) if reach_s is not None else None, "unit": "training s",
        "reference": round(nano_s, 2),
        "ratio": round(reach_s / nano_s, 4) if reach_s is not None else None,
        "bar": "ratio <= 0.6",
        "reached": reach_s is not None,
        "target_val_loss": target,
        "kiln_first_eval_at_target_s": round(first_s, 2) if first_s is not None else None,
        "kiln_tokens_to_target": round(reach_tokens) if reach_tokens is not None else None,
        "kiln_first_eval_at_target_tokens": first_tokens,
        "tokens_ratio": round(reach_tokens / nano_tokens, 4) if reach_tokens is not None else None,
        "nanogpt_final": {k: nano[-1][k] for k in ("step", "tokens", "train_s", "val_loss", "val_bpb")},
        "kiln_final": {k: kiln_curve[-1][k] for k in ("step", "tokens", "train_s", "val_loss", "val_bpb")},
    }


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KilnError as err:  # bad input: one line
        raise SystemExit(f"time_to_quality: {err}") from None


def run(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="nanoGPT's steps N")
    ap.add_argument("--kiln-steps-share", type=float, default=0.6, help="Kiln trains round(share x N) steps")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="Kiln's train config")
    ap.add_argument("--data", type=Path, help="a prepared corpus; default: the demo corpus prepped at vocab 8192")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench-ttq", help="the default corpus and Kiln's run")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--evals", type=int, default=20, help="evaluations over nanoGPT's N steps (Kiln: same steps)")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows scored at each evaluation")
    for key, default in (("n_layer", 6), ("n_head", 6), ("n_embd", 384), ("block_size", 256), ("batch", 8)):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=default)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not args.recipe.is_file():
        raise SystemExit(f"time_to_quality: --recipe {args.recipe}: not found")
    args.work.mkdir(parents=True, exist_ok=True)
    data = (args.data or prepped(args.work, "vocab_size=8192", name="prep-8192")).resolve()
    shape = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch")}
    shape["vocab_size"] = PreparedCorpus(data).vocab_size
    check_data(data, shape, args.eval_windows)
    kiln_steps = max(1, round(args.kiln_steps_share * args.steps))
    every = max(1, args.steps // args.evals)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    nano = run_nanogpt(data, shape, args.steps, every, args.eval_windows)
    ours = run_kiln(args.recipe.resolve(), data, shape, kiln_steps, every, args.eval_windows, args.work.resolve())
    record = {**report(nano, ours), "steps": args.steps, "kiln_steps": kiln_steps,
              "kiln_steps_share": args.kiln_steps_share, "eval_every_steps": every, "eval_windows": args.eval_windows,
              "shape": shape, "recipe": str(args.recipe), "data": str(data),
              "data_digest": PreparedCorpus(data).digest,
              "kiln_overrides": kiln_overrides(data, shape, kiln_steps, every, Path("RUN"))[:-1], "clock": CLOCK,
              "evaluator": "pipeline/evaluate.py::evaluate, stride = block_size, split val, first eval_windows windows",
              "curves": {"nanogpt": nano, "kiln": ours}, "machine": machine(),
              "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
              "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.results.mkdir(parents=True, exist_ok=True)
    png = args.results / f"time_to_quality_N{args.steps}.png"
    with contextlib.suppress(ImportError):  # matplotlib is optional
        from pipeline.plot import plot_lines

        plot_lines({f"nanoGPT ({args.steps} steps)": ([p["train_s"] for p in nano], [p["val_loss"] for p in nano]),
                    f"Kiln {args.recipe.stem} ({kiln_steps} steps)": ([p["train_s"] for p in ours],
                                                                       [p["val_loss"] for p in ours])},
                   png, "training wall-clock (s)", "validation loss (nats/token)",
                   f"time to quality, N = {args.steps}", {"nanoGPT's final val loss": record["target_val_loss"]})
        record["png"] = str(png)
    append_result(args.results, "time_to_quality", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
