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


def _log_stage_figures(run, summary: dict, curves: dict[str, list[str]]) -> None:
    """Each curve (metric -> summary keys in order: before, ..., after) as one metric over steps 0, 1, ...,
    and every other number of the summary as a metric at step 0: the run page shows what the stage did."""
    for metric, keys in curves.items():
        for step, key in enumerate(k for k in keys if summary.get(k) is not None):
            run.log_metrics({metric: summary[key]}, step=step)
    used = {k for keys in curves.values() for k in keys}
    run.log_metrics({k: v for k, v in summary.items() if k not in used}, step=0)


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
        summary["size_mb"], summary["parent_size_mb"] = summary["size_bytes"] / 1e6, summary["parent_size_bytes"] / 1e6
        _log_stage_figures(run, summary, {"perplexity": ["parent_perplexity", "perplexity"],
                                          "size_mb": ["parent_size_mb", "size_mb"]})
        summary["registered"] = _register(run, Path(out), "quantized", cfg.tracking, parent=model)
    return summary


def distill(teacher: str, student_config: str, data: str, out: str, cfg: DistillConfig, uri: str | None = None) -> dict:
    from pipeline.post.distill import distill as run_distill

    tracker = Tracker(cfg.tracking, uri)
    with tracker.stage_run("distill", params=cfg, run_dir=out) as run:
        parent = _materialize(tracker, teacher)
        run.log_dataset(data, split="train", context="distillation")
        summary = run_distill(parent, student_config, data, out, cfg)
        if tracker.enabled and run.active and (Path(out) / "metrics.jsonl").exists():
            tracker.sync(out)  # the distillation curves (loss, kl, ce, lr) the stage wrote to metrics.jsonl
        _log_stage_figures(run, summary, {"val_loss": ["teacher_val_loss", "val_loss"]})
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
        for step, loss in enumerate(summary.get("recovery_losses", []), 1):
            run.log_metrics({"recovery_loss": loss}, step=step)
        _log_stage_figures(run, summary, {"perplexity": ["parent_perplexity", "pruned_perplexity", "perplexity"]})
        summary["registered"] = _register(run, Path(out), "pruned", cfg.tracking, parent=model)
    return summary
