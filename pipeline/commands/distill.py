"""`kiln distill`: a teacher MODEL -> a smaller student trained on its soft targets, in an MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.common import add_common_options, load, locked, log_stage_figures, post_table, register

NAME = "distill"
HELP = "Distil a teacher MODEL into a smaller student (KL on soft targets + CE)."
EXAMPLE = ("kiln distill --teacher models:/kiln-125m@champion --student-config configs/model/tiny.yaml "
           "--data data/prepped --out models/student")


def add_arguments(p) -> None:
    add_common_options(p)
    p.add_argument("--teacher", required=True, metavar="MODEL")
    p.add_argument("--student-config", required=True, metavar="FILE")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> dict:
    cfg = load(args, "distill")
    from pipeline.console import is_main_process
    from pipeline.post.distill import distill
    from pipeline.tracking import Tracker

    out = args.out
    with locked(out, "kiln distill"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)
        with tracker.stage_run("distill", params=cfg, run_dir=out) as stage:
            parent = tracker.materialize(args.teacher)
            stage.log_dataset(args.data, split="train", context="distillation")
            summary = distill(parent, args.student_config, args.data, out, cfg)
            if tracker.enabled and stage.active and (Path(out) / "metrics.jsonl").exists():
                tracker.sync(out)  # the distillation curves (loss, kl, ce, lr) the stage wrote to metrics.jsonl
            log_stage_figures(stage, summary, {"val_loss": ["teacher_val_loss", "val_loss"]})
            if tracker.enabled:
                summary["registered"] = register(stage, Path(summary.get("model", out)), "distilled", cfg.tracking,
                                                 parent=args.teacher)
    if is_main_process():
        post_table("kiln distill", summary)
    return summary
