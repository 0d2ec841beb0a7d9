"""`kiln prep`: raw text -> cleaned, filtered, deduplicated, tokenized Megatron shards (Ray), in an MLflow run."""

from __future__ import annotations

from pipeline.commands.common import add_common_options, load, locked

NAME = "prep"
HELP = "Clean, filter, dedup and tokenize a corpus into Megatron shards (Ray)."
EXAMPLE = "kiln prep data/raw/*.jsonl.zst --out data/prepped --vocab-size 32000 --langs en,de --workers 8 --decontaminate evals/"


def add_arguments(p) -> None:
    add_common_options(p)
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
    p.add_argument("--overwrite", action="store_true", help="replace a finished DIR of other inputs or config "
                   "(once the new run has finished; without it such a DIR is never deleted)")
    p.add_argument("--langs", help="comma-separated language codes to keep, e.g. en,de")
    p.add_argument("--decontaminate", nargs="+", action="extend", metavar="PATH",
                   help="evaluation files/dirs (jsonl, json, txt, lm-eval task yaml): remove documents sharing a "
                        "13-gram with them (put it after INPUT)")


def run(args) -> dict:
    cfg = load(args, "prep", _flags(args))
    from data_prep.runner import prep
    from pipeline.console import print_table, progress
    from pipeline.tracking import Tracker

    with locked(args.out, "kiln prep"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)
        with tracker.stage_run("prep", params=cfg, run_dir=args.out) as stage:
            summary = prep(args.inputs, args.out, cfg, progress=progress, table=print_table, overwrite=args.overwrite)
            stage.log_corpus_output(args.out)
    return summary


def _flags(args) -> dict:
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
        "decontaminate": {"paths": args.decontaminate} if args.decontaminate else None,
    }
