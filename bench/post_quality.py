"""Post-training quality vs the teacher, on a model trained here (CPU, a few minutes).

    PYTHONPATH=. python bench/post_quality.py [--seeds 0 1 2] [--out DIR] [--threads 2]

Builds a Markov-chain corpus (tests/test_post_common.py: the best model must be calibrated, so
weight noise costs measurable loss), trains a 2-layer d=128 teacher, then runs int8-weight,
int8-dynamic, rtn and gptq at 4 bits (group 128 and per-channel), a distilled 1-layer student vs the same
student trained from scratch on the same tokens, and 2:4 pruning with recovery. Prints one JSON
line per figure {"bench", "value", "unit", "reference", "ratio"} and the comparison table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("COLUMNS", "160")  # rich: the whole table, also when stderr is a file
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_post_common import CORPUS, markov_corpus, train_teacher  # noqa: E402

from pipeline.config import DistillConfig, ModelConfig, PruneConfig, QuantizeConfig, TrainConfig  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.model.io import save_model_dir  # noqa: E402
from pipeline.post.common import train_steps  # noqa: E402
from pipeline.post.distill import distill  # noqa: E402
from pipeline.post.prune import prune  # noqa: E402
from pipeline.post.quantize import quantize  # noqa: E402
from pipeline.post.report import compare  # noqa: E402


def emit(bench: str, value: float, unit: str, reference: float, **extra) -> None:
    print(json.dumps({"bench": bench, "value": round(value, 6), "unit": unit, "reference": round(reference, 6),
                      "ratio": round(value / reference, 4) if reference else None, **extra}), flush=True)


def run(seed: int, out: Path, threads: int, table: bool) -> dict:
    torch.set_num_threads(threads)
    shutil.rmtree(out, ignore_errors=True)
    data = markov_corpus(out / "data", **CORPUS)
    t0 = time.perf_counter()
    teacher = train_teacher(data, out / "teacher", seed=seed)
    print(f"# seed {seed}: teacher trained in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    models = {"teacher": teacher}
    for name, cfg in {
        "int8-weight": QuantizeConfig(method="int8-weight", eval_windows=0),
        "int8-dynamic": QuantizeConfig(method="int8-dynamic", eval_windows=0),
        "rtn4-g128": QuantizeConfig(method="rtn", bits=4, group_size=128, eval_windows=0),
        "gptq4-g128": QuantizeConfig(method="gptq", bits=4, group_size=128, calib=str(data), calib_samples=1024, eval_windows=0),
        "rtn4-perchannel": QuantizeConfig(method="rtn", bits=4, group_size=0, eval_windows=0),
        "gptq4-perchannel": QuantizeConfig(method="gptq", bits=4, group_size=0, calib=str(data), calib_samples=1024, eval_windows=0),
    }.items():
        quantize(teacher, cfg, out / name)
        models[name] = out / name
    student_yaml = out / "student.yaml"
    student_yaml.write_text("model: {style: llama, n_layer: 1, n_head: 4, n_embd: 128}\n")
    train = TrainConfig(micro_batch_size=8, steps=60, lr=2e-3, min_lr=2e-4, warmup_steps=5, precision="fp32",
                        weight_decay=0.0, seed=seed)
    distill(teacher, student_yaml, data, out / "student", DistillConfig(train=train, eval_windows=0))
    models["student (kd)"] = out / "student" / "model"
    torch.manual_seed(seed)
    scfg = ModelConfig(style="llama", n_layer=1, n_head=4, n_embd=128, block_size=64, vocab_size=CORPUS["vocab_size"])
    scratch = GPT(scfg)
    train_steps(scratch, data, 60, lr=2e-3, batch_size=8, seed=seed, min_lr=2e-4, warmup=5)
    save_model_dir(scratch, scfg, out / "scratch")
    models["student (scratch)"] = out / "scratch"
    prune(teacher, PruneConfig(pattern="2:4", data=str(data), train={"steps": 100, "lr": 1e-3, "min_lr": 1e-4}, eval_windows=0), out / "pruned")
    models["pruned 2:4"] = out / "pruned"
    rows = {r["model"]: r for r in compare(models, data, max_windows=None, threads=threads,
                                           title=f"post-training vs teacher (seed {seed})")}
    t = rows["teacher"]
    emit("int8_weight_perplexity", rows["int8-weight"]["perplexity"], "ppl", t["perplexity"], seed=seed, bar="ratio <= 1.01")
    emit("int8_dynamic_perplexity", rows["int8-dynamic"]["perplexity"], "ppl", t["perplexity"], seed=seed)
    for g in ("g128", "perchannel"):
        d_rtn = rows[f"rtn4-{g}"]["perplexity"] - t["perplexity"]
        d_gptq = rows[f"gptq4-{g}"]["perplexity"] - t["perplexity"]
        emit(f"gptq4_{g}_perplexity_increase", d_gptq, "ppl", d_rtn, seed=seed, bar="ratio <= 0.5 (reference: rtn4)",
             rtn4_increase_pct=round(100 * d_rtn / t["perplexity"], 4))
    emit("student_kd_val_loss", rows["student (kd)"]["loss"], "nats/token", rows["student (scratch)"]["loss"], seed=seed,
         bar="ratio < 1 (reference: same student from scratch, same tokens)")
    emit("pruned_2of4_perplexity", rows["pruned 2:4"]["perplexity"], "ppl", t["perplexity"], seed=seed)
    for name in ("int8-weight", "int8-dynamic", "gptq4-g128"):
        emit(f"{name}_size_on_disk", rows[name]["size_mb"], "MB", t["size_mb"], seed=seed)
        emit(f"{name}_cpu_tokens_per_s", rows[name]["tokens_per_s"], "tokens/s", t["tokens_per_s"], seed=seed,
             threads=threads)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/bench-post")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for seed in args.seeds:
        run(seed, Path(args.out) / f"seed{seed}", args.threads, True)


if __name__ == "__main__":
    main()
