"""MLflow for every stage: runs, dataset inputs, logged models, registry, lineage, replay.

The only package that imports mlflow. Stages call a small interface and keep
running when tracking is off, on ranks other than 0, or when the server goes
away mid-run (one warning, then silence; `kiln track sync RUN_DIR` replays the
metrics the stage kept writing to RUN_DIR/metrics.jsonl):

    tracker = Tracker(cfg.tracking, uri=args.tracking_uri)
    with tracker.stage_run("train", params=cfg, run_dir=out) as run:
        run.log_dataset(prep_dir, "train")
        run.log_metrics({"loss": 2.3}, step=10)
        run.log_model(out / "model", stage="pretrain", register_as="kiln-125m", alias="champion")

Models are MLflow 3 LoggedModels (create -> upload MODEL dir -> finalize), tagged
`kiln.*` so that `lineage()` can walk model -> parents -> run -> dataset -> prep run.

    common.py    names (URIs, env vars, file names) and small helpers; no mlflow
    tracker.py   Tracker: client, experiment, pipeline_run / stage_run
    runs.py      StageRun: params, metrics, datasets, artifacts, log_model
    registry.py  models:/ URIs, register, fetch, the model cache, eval results
    lineage.py   model -> parents -> runs -> datasets -> prep runs
    sync.py      replay RUN_DIR/metrics.jsonl after an outage
"""

from pipeline.tracking.common import (
    DEFAULT_URI,
    HTTP_DEFAULTS,
    METRICS_FILE,
    PARAM_MAX,
    PARENT_ENV,
    RUN_RECORD,
    resolve_uri,
    system_tags,
)
from pipeline.tracking.registry import ModelRef, weights_sha256
from pipeline.tracking.runs import StageRun
from pipeline.tracking.tracker import Tracker

__all__ = ["DEFAULT_URI", "HTTP_DEFAULTS", "METRICS_FILE", "PARAM_MAX", "PARENT_ENV", "RUN_RECORD",
           "ModelRef", "StageRun", "Tracker", "resolve_uri", "system_tags", "weights_sha256"]
