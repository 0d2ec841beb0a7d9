"""`kiln sft`: a MODEL + conversations -> a chat model (supervised fine-tuning), in an MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.common import add_common_options, load, locked, log_stage_figures, post_table, register

NAME = "sft"
HELP = "Fine-tune a MODEL on conversations (loss on the assistant's turns), chat markers and template included."
EXAMPLE = ("kiln sft models:/kiln-125m@champion --data chats.jsonl --out models/125m-sft "
           "--set tracking.register_as=kiln-125m --set tracking.alias=sft")


def add_arguments(p) -> None:
    add_common_options(p)
    p.add_argument("model", metavar="MODEL", help="the base: a MODEL dir or models:/NAME@ALIAS")
    p.add_argument("--data", nargs="+", metavar="FILE", help='jsonl[.gz|.zst] / parquet files or dirs of '
                   '{"messages": [...]} or {"prompt", "completion"} records (data.paths)')
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> dict:
    base = {"data": {"paths": args.data}} if args.data else {}
    if args.steps is not None:
        base["train"] = {"steps": args.steps}
    cfg = load(args, "sft", base)
    from pipeline.console import is_main_process
    from pipeline.sft.train import sft
    from pipeline.tracking import Tracker

    out = Path(args.out)
    with locked(out, "kiln sft"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)
        with tracker.stage_run("sft", params=cfg, run_dir=out) as stage:
            parent = tracker.materialize(args.model)
            summary = sft(parent, cfg, out)
            stage.log_sft_data(summary["data_sha256"], cfg.data.paths,
                               {k: summary[k] for k in ("conversations_train", "conversations_val", "left_out")})
            if tracker.enabled and stage.active and (out / "metrics.jsonl").exists():
                tracker.sync(out)  # the loss curve the stage wrote to metrics.jsonl
            log_stage_figures(stage, summary, {"val_loss": ["base_val_loss", "val_loss"]})
            if tracker.enabled:
                summary["registered"] = register(stage, out / "model", "sft", cfg.tracking, parent=args.model)
    if is_main_process():
        post_table("kiln sft", summary)
    return summary
