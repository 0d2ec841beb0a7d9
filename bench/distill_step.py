"""Distillation's step on the post-training loop against what it is made of: `kiln train`'s step of the same
student plus the teacher's forward on the same batch, in one run, on the same threads (issue 28: <= 1.5x).

- Teacher: the demo model's shape (configs/model/demo.yaml: 4 layers, 192 wide, context 128), random weights,
  saved as a MODEL dir with the demo corpus' tokenizer (vocab 4096; the corpus is prepped once into WORK).
- Student: configs/model/demo-student.yaml (2 layers), micro-batch 8, fp32, one process.
- `kiln train` of the student (configs/train/demo-cpu.yaml at tp 1, zero 0): seconds per step from its
  metrics.jsonl (tokens / tokens_per_s of each logged interval, the first interval left out: warm-up).
- The teacher's forward: its logits for one micro-batch, timed here (no grad, `--reps` times, median).
- `kiln distill`'s loop (pipeline/post/distill.py on pipeline/post/loop.py): seconds per step from its
  metrics.jsonl `elapsed_s` between the first and the last logged step.

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/distill_step.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.__main__ import append_result, machine  # noqa: E402
from bench.moe_quality import kiln, prepped  # noqa: E402


def train_step_s(data: Path, steps: int, tmp: Path) -> float:
    out = tmp / "train"
    sets = ["model.n_layer=2", "parallel.tp=1", "parallel.zero_stage=0", f"data.paths=[{data}]", f"train.steps={steps}",
            "train.log_every=10", "train.eval_every=0", f"checkpoint.every={steps}", "tracking.enabled=false",
            f"out={out}"]
    kiln("train", "--config", str(ROOT / "configs/train/demo-cpu.yaml"), *[a for s in sets for a in ("--set", s)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(rows, rows[1:], strict=False)]
    seconds = [t / b["tokens_per_s"] for t, b in zip(tokens, rows[1:], strict=True)]
    steps_in = [b["step"] - a["step"] for a, b in zip(rows, rows[1:], strict=False)]
    return sum(seconds) / sum(steps_in)


def teacher_dir(data: Path, tmp: Path) -> Path:
    from pipeline.config import ModelConfig, load_yaml
    from pipeline.data.corpus import PreparedCorpus
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir

    corpus = PreparedCorpus(data)
    cfg = ModelConfig(**load_yaml(ROOT / "configs/model/demo.yaml")["model"], vocab_size=corpus.vocab_size)
    torch.manual_seed(0)
    return save_model_dir(GPT(cfg), cfg, tmp / "teacher", tokenizer=data / "tokenizer.model")


def teacher_forward_s(teacher: Path, batch: int, reps: int) -> float:
    from pipeline.model.io import load_model_dir

    model, _ = load_model_dir(teacher)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.block_size))
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def distill_step_s(teacher: Path, data: Path, steps: int, tmp: Path) -> float:
    out = tmp / "distill"
    sets = [f"train.steps={steps}", "train.log_every=10", f"checkpoint.every={steps}", "eval_windows=0",
            "tracking.enabled=false"]
    kiln("distill", "--teacher", str(teacher), "--student-config", str(ROOT / "configs/model/demo-student.yaml"),
         "--data", str(data), "--out", str(out), "--config", str(ROOT / "configs/post/distill.yaml"),
         *[a for s in sets for a in ("--set", s)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench-distill")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepped(args.work).resolve()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        teacher = teacher_dir(data, tmp)
        train_s = train_step_s(data, args.steps, tmp)
        forward_s = teacher_forward_s(teacher, 8, args.reps)
        distill_s = distill_step_s(teacher, data, args.steps, tmp)
    record = {"bench": "distill_step.seconds_per_step", "value": round(distill_s, 4), "unit": "s/step",
              "reference": round(train_s + forward_s, 4), "ratio": round(distill_s / (train_s + forward_s), 4),
              "bar": "ratio <= 1.5", "student_train_step_s": round(train_s, 4),
              "teacher_forward_s": round(forward_s, 4), "steps": args.steps, "micro_batch": 8,
              "threads": torch.get_num_threads(), "machine": machine(),
              "load_average_1min": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    append_result(args.results, "distill_step", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
