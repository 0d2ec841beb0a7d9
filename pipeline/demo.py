"""`kiln demo`: the whole pipeline, as a user would run it, on Python's own documentation.

corpus -> kiln prep (Ray, 2 workers) -> kiln train (2 processes, TP=2, DeepSpeed on gloo)
-> kiln export (HF) -> kiln quantize (int8, gptq4) -> kiln distill (a 2-layer student)
-> kiln sft (questions about the standard library's modules, answered by their docstrings)
-> registered in MLflow with aliases (and their transformers forms) -> kiln fetch by alias -> eval table
(perplexity + one lm-evaluation-harness task per alias, `kiln eval --compare`) -> kiln generate.

Each stage is the real `kiln` command in a subprocess (its progress shows as it runs),
all nested under one MLflow parent run; the eval table is computed here in one process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import KilnError, TrackingConfig
from pipeline.console import console, log, print_table

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
NAME = "kiln-demo"
PROMPTS = ["The tokenizer", "A list is", "Return the"]
CHAT_PROMPT = "What is the json module for?"  # a question of the demo's SFT data (data_prep/demo_corpus.py)
LM_EVAL_TASK = "kiln_stdlib_mc"  # pipeline/harness/tasks: multiple choice over the stdlib's docstrings


class Demo:
    """Runs the stages one after another and keeps what each reported."""

    def __init__(self, out: Path, quick: bool):
        self.out, self.quick = out, quick
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
        self.rows: list[dict] = []

    def kiln(self, stage: str, *args: str, launcher: list[str] | None = None) -> dict:
        """Run one `kiln` command with --json; return its summary, fail naming the stage and its log."""
        cmd = [*(launcher or []), "kiln", *args, "--json"]
        console.rule(f"[bold]{stage}[/bold]: {' '.join(cmd)}")
        start = time.time()
        proc = subprocess.run(cmd, cwd=self.out, env={**os.environ, **self.env}, stdout=subprocess.PIPE, text=True)
        seconds = time.time() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise KilnError(f"demo stage {stage!r} failed (exit {proc.returncode}): {' '.join(cmd)}")
        summary = json.loads(lines[-1])
        self.rows.append({"stage": stage, "seconds": round(seconds, 1), "output": _short(summary)})
        return summary

    def step(self, stage: str, fn, *args):
        console.rule(f"[bold]{stage}[/bold]")
        start = time.time()
        result = fn(*args)
        self.rows.append({"stage": stage, "seconds": round(time.time() - start, 1), "output": _short(result)})
        return result


def _short(summary) -> str:
    if isinstance(summary, list):
        return f"{len(summary)} items"
    if isinstance(summary, dict):
        keys = ["out", "model_dir", "digest", "val_loss", "loss", "size_bytes", "perplexity", "uri", "path", "text"]
        shown = {k: summary[k] for k in keys if summary.get(k) is not None}
        if isinstance(summary.get("registered"), dict):
            shown["registered"] = summary["registered"].get("uri")
        return ", ".join(f"{k}={(f'{v:.4g}' if isinstance(v, float) else ' '.join(str(v).split()))[:60]}"
                         for k, v in shown.items())
    return str(summary)[:80]


def run_demo(out: str | Path = "demo_out", quick: bool = False) -> dict:
    """Run everything; `quick` shrinks corpus and steps (the end-to-end test uses it)."""
    from rich.markup import escape

    from data_prep.demo_corpus import write_demo_chats, write_demo_corpus
    from pipeline.post.report import compare
    from pipeline.tracking import Tracker

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / ".kiln-demo").exists():  # never delete a directory the demo did not make
            raise KilnError(f"{out}: exists and is not a kiln demo directory; choose another --out")
        shutil.rmtree(out)  # the demo always starts from scratch: its figures must be its own
    out.mkdir(parents=True, exist_ok=True)
    (out / ".kiln-demo").touch()
    demo = Demo(out, quick)
    os.environ["MLFLOW_TRACKING_URI"] = demo.env["MLFLOW_TRACKING_URI"]
    started = time.time()
    train_steps = 40 if quick else 300
    distill_steps = 20 if quick else 120
    sft_steps = 20 if quick else 150
    windows = 16 if quick else 64  # val windows each eval scores (the eval table, GPTQ and distill before/after)
    tracker = Tracker(TrackingConfig(experiment="kiln-demo"))
    with tracker.pipeline_run("demo", params={"quick": quick, "train_steps": train_steps}):
        demo.env["KILN_PARENT_RUN_ID"] = os.environ.get("KILN_PARENT_RUN_ID", "")
        corpus = out / "corpus"
        paths = demo.step("corpus", lambda: write_demo_corpus(corpus, max_bytes=400_000 if quick else None))
        log.info("corpus: %d files, %.1f MB", len(paths), sum(p.stat().st_size for p in paths) / 1e6)
        prepped = demo.kiln("prep", "prep", str(corpus), "--out", "prep", "--config", str(CONFIGS / "prep/demo.yaml"),
                  "--workers", "2", "--set", "tracking.experiment=kiln-demo")
        reg = ["--set", "tracking.experiment=kiln-demo", "--set", f"tracking.register_as={NAME}"]
        torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2", "--no-python"]
        trained = demo.kiln("train", "train", "--config", str(CONFIGS / "train/demo-cpu.yaml"),
                            "--set", "data.paths=[prep]", "--set", "out=train", "--set", f"train.steps={train_steps}",
                            *reg, "--set", "tracking.alias=champion", launcher=torchrun)
        demo.kiln("export", "export", "train/model", "--format", "hf", "--out", "export-hf")
        champion = f"models:/{NAME}@champion"
        demo.kiln("quantize int8", "quantize", champion, "--method", "int8-weight", "--out", "int8",
                  *reg, "--set", "tracking.alias=int8")
        demo.kiln("quantize gptq4", "quantize", champion, "--config", str(CONFIGS / "post/gptq4.yaml"),
                  "--group-size", "64", "--calib", "prep", "--out", "gptq4", *reg, "--set", "tracking.alias=gptq4",
                  "--set", f"calib_samples={16 if quick else 32}", "--set", f"eval_windows={windows}")
        demo.kiln("distill", "distill", "--teacher", champion, "--student-config",
                  str(CONFIGS / "model/demo-student.yaml"), "--data", "prep", "--out", "student",
                  "--config", str(CONFIGS / "post/distill.yaml"), "--set", f"train.steps={distill_steps}",
                  "--set", f"eval_windows={windows}",
                  *reg, "--set", "tracking.alias=student")
        chats = demo.step("sft data", write_demo_chats, out / "chats.jsonl")
        demo.kiln("sft", "sft", champion, "--data", str(chats), "--out", "sft", "--steps", str(sft_steps),
                  "--config", str(CONFIGS / "post/sft.yaml"), "--set", "train.lr=5e-4", *reg, "--set", "tracking.alias=sft")
        demo.kiln("fetch @sft", "fetch", f"models:/{NAME}@sft", "--out", "fetched/sft")
        reply = demo.kiln("generate --chat", "generate", str(out / "fetched/sft"), "--chat", "--prompt", CHAT_PROMPT,
                          "--temperature", "0", "--max-new-tokens", "40")
        fetched = {}
        for alias in ("champion", "int8", "gptq4", "student"):
            demo.kiln(f"fetch @{alias}", "fetch", f"models:/{NAME}@{alias}", "--out", f"fetched/{alias}")
            fetched[alias] = out / "fetched" / alias
        table = demo.step("eval table", compare, fetched, out / "prep", windows)
        for row in table:
            tracker.attach_eval(f"models:/{NAME}@{row['model']}", {k: row[k] for k in
                                ("perplexity", "loss", "tokens_per_s") if row.get(k) is not None}, "val", out / "prep")
        # one lm-evaluation-harness task per model, as served (int8 on torchao, GPTQ codes); quick: int8 only
        for row in (r for r in table if not quick or r["model"] == "int8"):
            res = demo.kiln(f"lm-eval @{row['model']}", "eval", f"models:/{NAME}@{row['model']}", "--tasks", LM_EVAL_TASK,
                            *(["--limit", "24"] if quick else []), "--set", "tracking.experiment=kiln-demo")
            row[LM_EVAL_TASK + ".acc"] = res["lm_eval"]["results"][LM_EVAL_TASK]["acc"]
        demo.kiln("eval --compare", "eval", "--compare", f"models:/{NAME}")
        demo.kiln("fetch @int8 --format hf", "fetch", f"models:/{NAME}@int8", "--format", "hf", "--out", "fetched-hf/int8")
        samples = []
        for i, prompt in enumerate(PROMPTS[: 1 if quick else 3]):
            gen = demo.kiln(f"generate {i + 1}", "generate", str(out / "fetched/champion"), "--prompt", prompt,
                            "--max-new-tokens", "48", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
                            "--seed", str(i))
            samples.append(gen.get("text", ""))
        demo.kiln("lineage", "lineage", f"models:/{NAME}@student")
    wall = time.time() - started
    print_table("kiln demo: stages", demo.rows, ["stage", "seconds", "output"])
    summary = {
        "out": str(out), "wall_s": round(wall, 1), "val_loss": trained.get("val_loss"),
        "ln_vocab": math.log(prepped["vocab_size"]), "eval": table, "samples": samples,
        "curves_png": str(out / "train" / "curves.png"), "chat": {"prompt": CHAT_PROMPT, "reply": reply.get("text")},
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'} --host 127.0.0.1",
        # MLflow 3.17's UI picks GenAI vs model-training view from the URL (else the browser's last choice)
        "mlflow_ui_page": f"/#/experiments/{tracker.experiment_id()}?workflowType=machine_learning",
    }
    for prompt, text in zip(PROMPTS, samples, strict=False):
        console.print(f"[bold]{prompt}[/bold]{text}")
    console.print(f"[bold]user:[/bold] {escape(CHAT_PROMPT)}\n[bold]assistant:[/bold] {escape(reply.get('text', '').strip())}")
    console.print(f"[bold]done in {wall / 60:.1f} min[/bold]; loss curves: {summary['curves_png']}")
    console.print(f"look at runs, datasets, models and lineage: [bold]{summary['mlflow_ui']}[/bold], then open "
                  f"http://127.0.0.1:5000{summary['mlflow_ui_page']}")
    return summary
