"""`kiln train`: train a GPT (DeepSpeed ZeRO + TP + PP) in an MLflow run; resumes from the latest checkpoint."""

from __future__ import annotations

from pathlib import Path

from pipeline.commands.common import add_common_options, flags, load, locked, register

NAME = "train"
HELP = "Train a GPT (DeepSpeed ZeRO + TP + PP); resumes from the latest checkpoint."
EXAMPLE = "torchrun --nproc-per-node 8 --no-python kiln train --config configs/train/125m-1node.yaml"


def add_arguments(p) -> None:
    add_common_options(p)
    p.add_argument("--out", metavar="DIR")


def config(args):
    """The RunConfig of parsed `kiln train` flags (`kiln launch` reads a launched `kiln train` with it too)."""
    from pipeline.config import RunConfig

    return load(args, "train", flags(args, RunConfig))


def run(args) -> dict:
    from pipeline.data.corpus import check_prep_dir

    cfg = config(args)  # refused before the heavy imports
    for path in cfg.data.paths:
        check_prep_dir(path)
    from pipeline.plot import plot
    from pipeline.tracking import Tracker
    from pipeline.train import train

    with locked(cfg.out, "kiln train"):
        tracker = Tracker(cfg.tracking, args.tracking_uri)  # disabled on ranks other than 0
        layout = f"tp={cfg.parallel.tp},pp={cfg.parallel.pp},zero={cfg.parallel.zero_stage}"
        with tracker.stage_run("train", params=cfg, tags={"kiln.layout": layout}, run_dir=cfg.out) as stage:
            for path in cfg.data.paths:
                stage.log_dataset(path, split="train", context="training")
            summary = train(cfg, on_log=lambda step, metrics: stage.log_metrics(metrics, step))
            if tracker.enabled:
                curves = plot(cfg.out)
                stage.log_artifact(curves["out"], "plots")
                summary["registered"] = register(stage, Path(summary["model_dir"]), "pretrain", cfg.tracking)
    return summary
