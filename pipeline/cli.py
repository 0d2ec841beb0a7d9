"""`kiln` — the command line. Thin on purpose: parse, validate, call a library function.

Every subcommand takes `--config FILE`, repeated `--set key=value` and `--json`
(one JSON summary object as the last stdout line). Exit codes: 0 ok, 2 usage or
config error, 1 runtime failure; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from pipeline.config import ConfigError, KilnError

ISSUES = {
    "prep": "Corpus preparation on Ray: clean, filter, dedup, train tokenizer, shard-tokenize (issue 4)",
    "train": "GPT training with DeepSpeed ZeRO + tensor + pipeline parallelism (issue 5)",
    "launch": "Multi-node launch: DeepSpeed hostfile, SLURM, torchrun, Ray cluster jobs (issue 6)",
    "tracking": "MLflow tracking, lineage and registry; fetch, evaluate and generate (issue 7)",
    "post": "Post-training: quantize (int8, GPTQ int4), distill, prune (issue 8)",
    "demo": "The whole pipeline in one command (issue 9)",
}


class NotImplementedYet(KilnError):
    def __init__(self, area: str):
        super().__init__(f"not implemented yet: {ISSUES[area]}")


# --------------------------------------------------------------------------- handlers
# Each returns a dict: the `--json` summary. Heavy imports happen inside, so
# `kiln --help` stays fast and a missing optional stage cannot break the others.


def _config(args, kind: str, base: dict | None = None):
    from pipeline.config import load_config

    return load_config(kind, args.config, args.set, base={k: v for k, v in (base or {}).items() if v is not None})


def cmd_prep(args) -> dict:
    _config(args, "prep", _prep_flags(args))
    raise NotImplementedYet("prep")


def _prep_flags(args) -> dict:
    langs = args.langs.split(",") if args.langs else None
    return {
        "text_field": args.text_field,
        "id_field": args.id_field,
        "workers": args.workers,
        "ray_address": args.ray_address,
        "vocab_size": args.vocab_size,
        "tokenizer": args.tokenizer,
        "val_fraction": args.val_fraction,
        "dedup": False if args.no_dedup else None,
        "langs": langs,
    }


def cmd_train(args) -> dict:
    _config(args, "train", {"out": args.out})
    raise NotImplementedYet("train")


def cmd_export(args) -> dict:
    raise NotImplementedYet("train")


def cmd_quantize(args) -> dict:
    cfg = _config(args, "quantize", {"method": args.method, "bits": args.bits, "group_size": args.group_size, "calib": args.calib})
    from pipeline.post.quantize import quantize

    summary = quantize(args.model, cfg, args.out)
    _post_table("kiln quantize", summary)
    return summary


def cmd_distill(args) -> dict:
    cfg = _config(args, "distill")
    from pipeline.console import is_main_process
    from pipeline.post.distill import distill

    summary = distill(args.teacher, args.student_config, args.data, args.out, cfg)
    if is_main_process():
        _post_table("kiln distill", summary)
    return summary


def cmd_prune(args) -> dict:
    cfg = _config(args, "prune", {"sparsity": args.sparsity, "pattern": args.pattern})
    from pipeline.post.prune import prune

    summary = prune(args.model, cfg, args.out)
    _post_table("kiln prune", summary)
    return summary


def _post_table(title: str, summary: dict) -> None:
    from pipeline.console import kv_table

    kv_table(title, {k: v for k, v in summary.items() if not isinstance(v, (dict, list))})


def cmd_eval(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_generate(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_register(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_fetch(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_lineage(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_track(args) -> dict:
    raise NotImplementedYet("tracking")


def cmd_plot(args) -> dict:
    raise NotImplementedYet("train")


def cmd_launch(args) -> dict:
    raise NotImplementedYet("launch")


def cmd_demo(args) -> dict:
    from pipeline.demo import run_demo

    return run_demo()


def cmd_plan(args) -> dict:
    from pipeline.console import kv_table
    from pipeline.plan import make_plan

    layout = {
        "tp": args.tp,
        "pp": args.pp,
        "zero_stage": args.zero_stage,
        "precision": args.precision,
        "micro_batch_size": args.micro_batch_size,
        "seq_len": args.seq_len,
        "activation_checkpointing": args.activation_checkpointing,
    }
    if args.dp:
        layout["dp"] = args.dp
    plan = make_plan(
        flops=args.flops, gpus=args.gpus, hours=args.hours, gpu=args.gpu, mfu=args.mfu,
        tokens_per_param=args.tokens_per_param, model=args.model, layout=layout,
    )
    shown = {
        "compute budget": f"{plan['flops']:.3e} FLOPs",
        "compute-optimal params (Chinchilla)": f"{plan['optimal_params'] / 1e9:,.2f} B",
        "compute-optimal tokens": f"{plan['optimal_tokens'] / 1e9:,.0f} B",
        "nearest shipped config": f"configs/model/{plan['model_config']}.yaml ({plan['model_params'] / 1e9:.2f} B params)",
        "tokens that config gets from the budget": f"{plan['tokens_for_model'] / 1e9:,.0f} B",
        "layout": ", ".join(f"{k}={v}" for k, v in plan["layout"].items() if v is not None),
    }
    if "tokens_per_s_needed" in plan:
        shown["cluster tokens/s needed"] = f"{plan['tokens_per_s_needed']:,.0f}"
    shown.update({f"memory/GPU: {k}": f"{v:,.2f} GiB" for k, v in plan["memory_gib"].items()})
    kv_table("kiln plan", shown)
    return plan


# --------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
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

    def add(name: str, func: Callable, summary: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        _common(p)
        return p

    p = add("prep", cmd_prep, "Clean, filter, dedup and tokenize a corpus into Megatron shards (Ray).",
            "kiln prep data/raw/*.jsonl.zst --out data/prepped --vocab-size 32000 --langs en,de --workers 8")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="jsonl[.gz|.zst] / parquet files, globs or directories")
    p.add_argument("--out", required=True, metavar="DIR")
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

    p = add("train", cmd_train, "Train a GPT (DeepSpeed ZeRO + TP + PP); resumes from the latest checkpoint.",
            "torchrun --nproc-per-node 8 --no-python kiln train --config configs/train/125m-1node.yaml")
    p.add_argument("--out", metavar="DIR")

    p = add("export", cmd_export, "Consolidate a checkpoint into a MODEL dir (safetensors) or a HF transformers dir.",
            "kiln export runs/125m/checkpoints/latest --format hf --out exports/125m-hf")
    p.add_argument("source", metavar="CKPT|MODEL")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("quantize", cmd_quantize, "Quantize a MODEL: int8 (torchao), round-to-nearest 4-bit, or GPTQ 4-bit.",
            "kiln quantize runs/125m/model --method gptq4 --group-size 128 --calib data/prepped --out models/125m-gptq4")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--method", choices=["int8-weight", "int8-dynamic", "rtn4", "gptq4"])
    p.add_argument("--bits", type=int)
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

    p = add("eval", cmd_eval, "Perplexity and bits per byte of a MODEL on prepared shards.",
            "kiln eval models:/kiln-125m@int8 --data data/prepped --split val --max-tokens 1000000")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--max-tokens", type=int)

    p = add("generate", cmd_generate, "Generate text from a MODEL (greedy, temperature, top-k, top-p).",
            "kiln generate models:/kiln-125m@champion --prompt 'The tokenizer' --max-new-tokens 64 --top-p 0.9 --seed 0")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = add("register", cmd_register, "Register a MODEL dir in the MLflow model registry, optionally with an alias.",
            "kiln register runs/125m/model --name kiln-125m --alias champion")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--name", required=True)
    p.add_argument("--alias")

    p = add("fetch", cmd_fetch, "Download a registered model into a MODEL dir and verify its checksums.",
            "kiln fetch models:/kiln-125m@champion --out /tmp/champion")
    p.add_argument("uri", metavar="models:/NAME@ALIAS|models:/NAME/VERSION")
    p.add_argument("--out", required=True, metavar="DIR")

    p = add("lineage", cmd_lineage, "Print the chain model -> parents -> training run -> dataset -> prep run.",
            "kiln lineage models:/kiln-125m@int8 --json")
    p.add_argument("uri", metavar="models:/NAME@ALIAS")

    p = add("plot", cmd_plot, "Plot loss and throughput curves from a run's metrics.jsonl to PNG.",
            "kiln plot runs/125m --out runs/125m/curves.png")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="PNG")

    p = add("track", cmd_track, "Replay metrics buffered in metrics.jsonl to MLflow after an outage.",
            "kiln track sync runs/125m")
    p.add_argument("action", choices=["sync"])
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = add("plan", cmd_plan, "Compute-optimal model/tokens for a budget (Chinchilla) and per-GPU memory of a layout.",
            "kiln plan --gpus 64 --hours 720 --gpu h100 --tp 2 --zero-stage 1 --micro-batch-size 4")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="total training FLOPs")
    budget.add_argument("--gpus", type=int, help="GPU count (with --hours)")
    p.add_argument("--hours", type=float)
    p.add_argument("--gpu", default="h100", help="h100, h200, b200, a100, l40s, a10g, v100")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--model", help="a configs/model name or YAML file for the memory estimate (default: nearest)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, help="default: gpus / (tp*pp)")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--activation-checkpointing", action="store_true")

    p = add("launch", cmd_launch, "Launch a multi-node job: deepspeed hostfile, SLURM, torchrun or a Ray job.",
            "kiln launch slurm --nodes 2 --gpus-per-node 8 --dry-run -- kiln train --config configs/train/1.3b-2x8.yaml")
    p.add_argument("launcher", choices=["deepspeed", "slurm", "torchrun", "ray"])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    add("demo", cmd_demo, "Run the whole pipeline on a small corpus built from text that ships with Python.", "kiln demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    from pipeline.console import log, setup_logging

    setup_logging(args.verbose)
    prog = f"kiln {args.command}"
    try:
        result = args.func(args)
    except ConfigError as err:
        for line in str(err).splitlines():
            print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
    except KilnError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: still one line, traceback with -v
        if args.verbose:
            log.exception("unexpected failure")
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result if isinstance(result, dict) else {"result": result}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
