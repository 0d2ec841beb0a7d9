"""`kiln` — the command line. Thin on purpose: parse, validate, call a handler (pipeline/commands.py).

Every subcommand takes `--config FILE`, repeated `--set key=value` and `--json`
(one JSON summary object as the last stdout line). Exit codes: 0 ok, 2 usage or
config error, 1 runtime failure; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from typing import get_args

from pipeline.commands import (
    cmd_demo,
    cmd_distill,
    cmd_eval,
    cmd_export,
    cmd_fetch,
    cmd_generate,
    cmd_launch,
    cmd_lineage,
    cmd_plan,
    cmd_plot,
    cmd_prep,
    cmd_prune,
    cmd_quantize,
    cmd_register,
    cmd_track,
    cmd_train,
    cmd_verify,
)
from pipeline.config import ConfigError, EvalConfig, KilnError, QuantizeConfig, TrainConfig, clip, first_line
from pipeline.credentials import redact
from pipeline.quant_methods import ALIASES

# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    """The options every subcommand has; --config/--set only where it reads a config (else they are refused,
    not ignored)."""
    g = p.add_argument_group("common options")
    if config:
        g.add_argument("--config", metavar="FILE", help="YAML config (may `extends:` others)")
        g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, value parsed as YAML (repeatable): --set train.lr=3e-4")
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Raw text -> cleaned shards -> trained GPT -> quantized/distilled -> registered in MLflow.",
        epilog="Run `kiln COMMAND --help` for each command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, summary: str, example: str, config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        _common(p, config)
        return p

    p = add("prep", cmd_prep, "Clean, filter, dedup and tokenize a corpus into Megatron shards (Ray).",
            "kiln prep data/raw/*.jsonl.zst --out data/prepped --vocab-size 32000 --langs en,de --workers 8 --decontaminate evals/")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="jsonl[.gz|.zst] / parquet files, globs or directories")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a finished DIR of other inputs or config "
                   "(once the new run has finished; without it such a DIR is never deleted)")
    p.add_argument("--text-field")
    p.add_argument("--id-field")
    p.add_argument("--workers", type=int)
    p.add_argument("--ray-address", help="existing Ray cluster (default: $RAY_ADDRESS or a local one)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int)
    tok.add_argument("--tokenizer", metavar="FILE.model", help="use this sentencepiece model instead of training one")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--langs", help="comma-separated language codes to keep, e.g. en,de")
    p.add_argument("--decontaminate", nargs="+", action="extend", metavar="PATH",
                   help="evaluation files/dirs (jsonl, json, txt, lm-eval task yaml): remove documents sharing a "
                        "13-gram with them (put it after INPUT)")

    p = add("train", cmd_train, "Train a GPT (DeepSpeed ZeRO + TP + PP); resumes from the latest checkpoint.",
            "torchrun --nproc-per-node 8 --no-python kiln train --config configs/train/125m-1node.yaml")
    p.add_argument("--out", metavar="DIR")

    p = add("verify", cmd_verify, "Hash every byte of prepared corpora against their manifests (training checks "
            "only sizes, headers and fingerprints at start-up).",
            "kiln verify data/prepped data/code --threads 8", config=False)
    p.add_argument("data", nargs="+", metavar="DATA", help="`kiln prep` output directories")
    p.add_argument("--threads", type=int, default=4, help="shards hashed at once")

    p = add("export", cmd_export, "Consolidate a checkpoint into a MODEL dir (safetensors) or a HF transformers dir.",
            "kiln export runs/125m/checkpoints/latest --format hf --out exports/125m-hf", config=False)
    p.add_argument("source", metavar="CKPT|MODEL")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("quantize", cmd_quantize, "Quantize a MODEL: int8 (torchao), round-to-nearest or GPTQ at 2-8 bits.",
            "kiln quantize runs/125m/model --method gptq --bits 4 --group-size 128 --calib data/prepped --out models/125m-gptq4")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", choices=[*get_args(QuantizeConfig.model_fields["method"].annotation), *ALIASES])
    p.add_argument("--bits", type=int, help=QuantizeConfig.model_fields["bits"].description)
    p.add_argument("--group-size", type=int)
    p.add_argument("--calib", metavar="DIR", help="prep output dir for calibration sequences")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("distill", cmd_distill, "Distil a teacher MODEL into a smaller student (KL on soft targets + CE).",
            "kiln distill --teacher models:/kiln-125m@champion --student-config configs/model/tiny.yaml --data data/prepped --out models/student")
    p.add_argument("--teacher", required=True, metavar="MODEL")
    p.add_argument("--student-config", required=True, metavar="FILE")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("prune", cmd_prune, "Magnitude-prune a MODEL (unstructured or 2:4).",
            "kiln prune runs/125m/model --sparsity 0.5 --pattern 2:4 --out models/125m-2of4")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--pattern", choices=["unstructured", "2:4"])
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("eval", cmd_eval, "Perplexity on prepared shards (--data) and lm-evaluation-harness tasks (--tasks) "
            "of a MODEL; --compare prints a registered model's results across its aliases.",
            "kiln eval models:/kiln-125m@int8 --data data/prepped --tasks kiln_pydoc,kiln_stdlib_mc --limit 100\n"
            "  kiln eval --compare models:/kiln-125m")
    p.add_argument("model", nargs="?", metavar="MODEL", help="MODEL dir, transformers dir or models:/ URI")
    p.add_argument("--data", metavar="DIR", help="prep output: perplexity and bits/byte on its --split")
    p.add_argument("--split", choices=get_args(EvalConfig.model_fields["split"].annotation))
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--tasks", metavar="LIST", help="comma-separated lm-eval tasks (Kiln's offline ones: "
                   "kiln_pydoc, kiln_stdlib_mc; any task of lm-eval's catalogue where its data can be had)")
    p.add_argument("--include-path", action="append", metavar="DIR", help="more lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, metavar="N", help="documents per task (a fraction when below 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--compare", metavar="models:/NAME", help="print the recorded evals of every alias of NAME")

    p = add("generate", cmd_generate, "Generate text from a MODEL (greedy, temperature, top-k, top-p).",
            "kiln generate models:/kiln-125m@champion --prompt 'The tokenizer' --max-new-tokens 64 --top-p 0.9 --seed 0")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", help="required, here or as prompt: in --config")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)

    p = add("register", cmd_register, "Register a MODEL dir in the MLflow model registry, optionally with an alias.",
            "kiln register runs/125m/model --name kiln-125m --alias champion")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--name", required=True)
    p.add_argument("--alias")

    p = add("fetch", cmd_fetch, "Download a registered model into a MODEL dir and verify its checksums.",
            "kiln fetch models:/kiln-125m@champion --out /tmp/champion --format hf")
    p.add_argument("uri", metavar="models:/NAME@ALIAS|models:/NAME/VERSION")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", choices=["kiln", "hf"], default="kiln",
                   help="kiln: the MODEL dir; hf: its transformers form (from_pretrained loads it)")

    p = add("lineage", cmd_lineage, "Print the chain model -> parents -> training run -> dataset -> prep run.",
            "kiln lineage models:/kiln-125m@int8 --json")
    p.add_argument("uri", metavar="models:/NAME@ALIAS")

    p = add("plot", cmd_plot, "Plot loss and throughput curves from a run's metrics.jsonl to PNG.",
            "kiln plot runs/125m --out runs/125m/curves.png", config=False)
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG")

    p = add("track", cmd_track, "Replay metrics buffered in metrics.jsonl to MLflow after an outage.",
            "kiln track sync runs/125m")
    p.add_argument("action", choices=["sync"])
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = add("plan", cmd_plan, "Compute-optimal model/tokens for a budget (Chinchilla) and per-GPU memory of a layout.",
            "kiln plan --gpus 64 --hours 720 --gpu h100 --tp 2 --zero-stage 1 --micro-batch-size 4", config=False)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="total training FLOPs")
    budget.add_argument("--gpus", type=int, help="GPU count (with --hours)")
    p.add_argument("--hours", type=float)
    p.add_argument("--gpu", default="h100", help="h100, h200, b200, a100, l40s, a10g, v100")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--model", help="a configs/model name or YAML file for the memory estimate (default: nearest)")
    layout = p.add_argument_group("layout to check (none given: kiln plan recommends one, as the shipped configs do)")
    layout.add_argument("--tp", type=int, help="default 1")
    layout.add_argument("--pp", type=int, help="default 1")
    layout.add_argument("--dp", type=int, help="default: gpus / (tp*pp)")
    layout.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default 1")
    layout.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default bf16")
    layout.add_argument("--micro-batch-size", type=int, help="default 1")
    layout.add_argument("--seq-len", type=int)
    layout.add_argument("--activation-checkpointing", nargs="?", const="full", default=None,
                        choices=get_args(TrainConfig.model_fields["activation_checkpointing"].annotation),
                        help="alone: full")
    layout.add_argument("--sequence-parallel", action="store_true", help="with --tp > 1: norms and residuals split "
                        "over the sequence (parallel.sequence_parallel)")

    _add_launch(sub)

    p = add("demo", cmd_demo, "Run the whole pipeline on a small corpus built from text that ships with Python.",
            "kiln demo --out demo_out", config=False)
    p.add_argument("--out", default="demo_out", metavar="DIR", help="working directory (recreated)")
    p.add_argument("--quick", action="store_true", help="a smaller corpus and fewer steps (the end-to-end test)")
    return parser


def parse_command(name: str, argv: list[str]) -> argparse.Namespace:
    """`kiln NAME ARGV` parsed by the parser above, as `kiln NAME` would parse it; ConfigError (one line) where
    it would refuse. `kiln launch` reads the `kiln train` it launches with this, so a new flag needs no second parser."""
    said = StringIO()
    try:
        with redirect_stderr(said), redirect_stdout(said):
            return build_parser().parse_args([name, *argv])
    except SystemExit as exit_:  # a usage error (argparse's last line says which), or --help
        lines = said.getvalue().strip().splitlines()
        why = lines[-1] if exit_.code and lines else "it asks for --help"
        raise ConfigError(f"the launched `kiln {name}` would not start: {why}") from None


RAY_SECURITY = ("SECURITY: Ray's job API runs any code it is sent and has no authentication; keep a cluster "
                "head's dashboard/jobs port (8265) on a private network or an SSH tunnel, never public.")


def _add_launch(sub) -> None:
    launch = sub.add_parser("launch", help="Launch a multi-node job: deepspeed hostfile, SLURM, torchrun or a Ray job.",
                            description="Validate a multi-node job (hostfile, layout vs world size, master) and launch it.",
                            epilog="example:\n  kiln launch slurm --nodes 2 --gpus-per-node 8 --dry-run -- kiln train --config "
                                   "configs/train/1.3b-2x8.yaml\n\nRun `kiln launch LAUNCHER --help` for each launcher's options.",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = launch.add_subparsers(dest="launcher", required=True, metavar="LAUNCHER")
    examples = {
        "deepspeed": ("DeepSpeed launcher over a hostfile (`hostname slots=N` lines); writes .deepspeed_env.",
                      "kiln launch deepspeed --hostfile hosts.txt --num-nodes 2 --gpus-per-node 8 --dry-run -- kiln train --config configs/train/1.3b-2x8.yaml"),
        "torchrun": ("torchrun on this node (static or c10d rendezvous); run the same on every node with its --node-rank.",
                     "kiln launch torchrun --nodes 2 --gpus-per-node 8 --node-rank 0 --master-addr node0 -- kiln train --config configs/train/1.3b-2x8.yaml"),
        "slurm": ("Render launch/slurm.sbatch (srun + torchrun, requeue on preemption) and sbatch it.",
                  "kiln launch slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu --account myproj --dry-run -- kiln train --config configs/train/1.3b-2x8.yaml"),
        "ray": ("Submit a command (usually kiln prep) to a Ray cluster's job API. " + RAY_SECURITY,
                "kiln launch ray --address http://head:8265 -- kiln prep data/raw --out data/prepped --workers 64"),
    }
    for name, (summary, example) in examples.items():
        p = kinds.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=cmd_launch)
        _common(p, config=False)  # the launched command takes its own --config
        p.add_argument("--dry-run", action="store_true", help="print what would run (per node) and exit")
        p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment (repeatable)")
        if name in ("deepspeed", "torchrun"):
            p.add_argument("--master-addr", default=None if name == "deepspeed" else "127.0.0.1")
            p.add_argument("--master-port", type=int, default=29500)
        if name == "deepspeed":
            p.add_argument("--hostfile", required=True)
            p.add_argument("--num-nodes", type=int)
            p.add_argument("--gpus-per-node", type=int)
            p.add_argument("--include", help="NODE[:SLOT,...][@NODE...] (DeepSpeed syntax)")
            p.add_argument("--exclude", help="NODE[:SLOT,...][@NODE...] (DeepSpeed syntax)")
        if name in ("torchrun", "slurm"):
            p.add_argument("--nodes", type=int, default=1)
            p.add_argument("--gpus-per-node", type=int, default=1)
        if name == "torchrun":
            p.add_argument("--node-rank", type=int, default=0)
            p.add_argument("--rdzv", choices=["static", "c10d"], default="static")
            p.add_argument("--run-id", default="kiln")
            p.add_argument("--wait-master", type=float, default=30.0, help="seconds a node > 0 waits for the master")
        if name == "slurm":
            p.add_argument("--time")
            p.add_argument("--partition")
            p.add_argument("--account")
            p.add_argument("--job-name")
            p.add_argument("--cpus-per-task", type=int)
        if name == "ray":
            p.add_argument("--address", help="Ray job API, e.g. http://head:8265 (default: $RAY_ADDRESS or local)")
            p.add_argument("--working-dir", default=".")
            p.add_argument("--pip", action="append", help="extra pip requirement for the job's runtime env")
            p.add_argument("--detach", action="store_true", help="submit and return without streaming logs")
        p.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="what to launch")


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:  # `kiln ...` or `python -m pipeline.cli`: this process ends now. Its objects are frozen so
        gc.freeze()  # that interpreter teardown skips a full collection over torch's and DeepSpeed's (~1.5 s CPU)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    from pipeline.console import log, setup_logging

    setup_logging(args.verbose)
    prog = f"kiln {args.command}" + (f" {args.launcher}" if args.command == "launch" else "")
    try:
        result = args.func(args)
    except ConfigError as err:
        _error(prog, str(err))
        return 2
    except KilnError as err:
        _error(prog, str(err))
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: still one line, traceback with -v
        if args.verbose:
            log.exception("unexpected failure")
        _error(prog, f"{type(err).__name__}: {first_line(err)}")
        return 1
    if args.json and os.environ.get("RANK", "0") == "0":  # one summary per job, not one per rank
        print(redact(json.dumps(result if isinstance(result, dict) else {"result": result}, default=str)))
    return 0


MAX_ERROR_LINES = 20  # a config error prints one line per problem; a flood of them is cut


def _error(prog: str, text: str) -> None:
    """Error lines on stderr: credentials redacted, each line clipped, at most MAX_ERROR_LINES."""
    lines = redact(text).splitlines() or [""]
    for line in lines[:MAX_ERROR_LINES]:
        print(f"{prog}: error: {clip(line)}", file=sys.stderr)
    if len(lines) > MAX_ERROR_LINES:
        print(f"{prog}: error: … and {len(lines) - MAX_ERROR_LINES} more", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
