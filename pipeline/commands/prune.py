"""`kiln prune`: a MODEL dir -> magnitude-pruned weights (unstructured or 2:4), in an MLflow run."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.common import add_common_options, load, locked, log_stage_figures, post_table, register

NAME = "prune"
HELP = "Magnitude-prune a MODEL (unstructured or 2:4)."
EXAMPLE = "kiln prune runs/125m/model --sparsity 0.5 --pattern 2:4 --out models/125m-2of4"


def add_arguments(p) -> None:
    add_common_options(p)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--sparsity", type=float)
    p.add_argument("--pattern", choices=["unstructured", "2:4"])
    p.add_argument("--out", required=True, metavar="DIR")


def run(args) -> dict:
    cfg = load(args, "prune", {"sparsity": args.sparsity, "pattern": args.pattern})
    from pipeline.post.prune import prune
    from pipeline.tracking import Tracker

    with locked(args.out, "kiln prune"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)
        with tracker.stage_run("prune", params=cfg, run_dir=args.out) as stage:
            parent = tracker.materialize(args.model)
            summary = prune(parent, cfg, args.out)
            for step, loss in enumerate(summary.get("recovery_losses", []), 1):
                stage.log_metrics({"recovery_loss": loss}, step=step)
            log_stage_figures(stage, summary, {"perplexity": ["parent_perplexity", "pruned_perplexity", "perplexity"]})
            summary["registered"] = register(stage, Path(args.out), "pruned", cfg.tracking, parent=args.model)
    post_table("kiln prune", summary)
    return summary
