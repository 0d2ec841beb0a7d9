"""Every stage under MLflow tracking: one nested run, its inputs, its outputs, its registered model.

The stages themselves (data_prep.runner, pipeline.train, pipeline.post.*) know
nothing about MLflow; the CLI calls them through these wrappers. Tracking never
stops a stage: when the server is unreachable the Tracker warns once and the
stage goes on (metrics stay in metrics.jsonl for `kiln track sync`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DistillConfig, PrepConfig, PruneConfig, QuantizeConfig, RunConfig, TrackingConfig
from pipeline.tracking import Tracker


def _materialize(tracker: Tracker, model: str | Path) -> Path:
    """A models:/ URI becomes a local MODEL dir (fetched once, checksums verified)."""
    if str(model).startswith("models:/"):
        return tracker.materialize(model)
    return Path(model)


def _register(run, model_dir: Path, stage: str, tracking: TrackingConfig, parent=None) -> dict | None:
    return run.log_model(model_dir, stage, parent=parent, register_as=tracking.register_as, alias=tracking.alias)


def prep(inputs: list[str], out: str, cfg: PrepConfig, uri: str | None = None, **ui) -> dict:
    from data_prep.runner import prep as run_prep

    tracker = Tracker(cfg.tracking, uri)
    with tracker.stage_run("prep", params=cfg, run_dir=out) as run:
        summary = run_prep(inputs, out, cfg, **ui)
        run.log_corpus_output(out)
    return summary


def train(cfg: RunConfig, uri: str | None = None) -> dict:
    from pipeline.plot import plot
    from pipeline.train import train as run_train

    tracker = Tracker(cfg.tracking, uri)  # disabled on ranks other than 0
    layout = f"tp={cfg.parallel.tp},pp={cfg.parallel.pp},zero={cfg.parallel.zero_stage}"
    with tracker.stage_run("train", params=cfg, tags={"kiln.layout": layout}, run_dir=cfg.out) as run:
        for path in cfg.data.paths:
            run.log_dataset(path, split="train", context="training")
        summary = run_train(cfg, on_log=lambda step, metrics: run.log_metrics(metrics, step))
        if tracker.enabled:
            curves = plot(cfg.out)
            run.log_artifact(curves["out"], "plots")
            summary["registered"] = _register(run, Path(summary["model_dir"]), "pretrain", cfg.tracking)
    return summary


def quantize(model: str, cfg: QuantizeConfig, out: str, uri: str | None = None) -> dict:
    from pipeline.post.quantize import quantize as run_quantize

    tracker = Tracker(cfg.tracking, uri)
    with tracker.stage_run("quantize", params=cfg, run_dir=out) as run:
        parent = _materialize(tracker, model)
        if cfg.calib:
            run.log_dataset(cfg.calib, split="train", context="calibration")
        summary = run_quantize(parent, cfg, out)
        summary["registered"] = _register(run, Path(out), "quantized", cfg.tracking, parent=model)
    return summary


def distill(teacher: str, student_config: str, data: str, out: str, cfg: DistillConfig, uri: str | None = None) -> dict:
    from pipeline.post.distill import distill as run_distill

    tracker = Tracker(cfg.tracking, uri)
    with tracker.stage_run("distill", params=cfg, run_dir=out) as run:
        parent = _materialize(tracker, teacher)
        run.log_dataset(data, split="train", context="distillation")
        summary = run_distill(parent, student_config, data, out, cfg)
        if tracker.enabled:
            summary["registered"] = _register(run, Path(summary.get("model", out)), "distilled", cfg.tracking,
                                              parent=teacher)
    return summary


def prune(model: str, cfg: PruneConfig, out: str, uri: str | None = None) -> dict:
    from pipeline.post.prune import prune as run_prune

    tracker = Tracker(cfg.tracking, uri)
    with tracker.stage_run("prune", params=cfg, run_dir=out) as run:
        parent = _materialize(tracker, model)
        summary = run_prune(parent, cfg, out)
        summary["registered"] = _register(run, Path(out), "pruned", cfg.tracking, parent=model)
    return summary
