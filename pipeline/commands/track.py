"""`kiln track sync RUN_DIR`: metrics buffered in RUN_DIR/metrics.jsonl replayed into MLflow after an outage."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.commands import common

NAME = "track"
HELP = "Replay metrics buffered in metrics.jsonl to MLflow after an outage."
EXAMPLE = "kiln track sync runs/125m"


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("action", choices=["sync"])
    p.add_argument("run_dir", metavar="RUN_DIR")


def run(args) -> dict:
    """The URI comes from the flags/env, else from RUN_DIR's record."""
    from pipeline.console import log
    from pipeline.credentials import without_mask
    from pipeline.tracking import RUN_RECORD, Tracker

    tracker = common.tracker(args)
    record = Path(args.run_dir) / RUN_RECORD
    if not (args.tracking_uri or tracker.cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")) and record.exists():
        # the record holds the URI redacted; credentials come from MLFLOW_TRACKING_USERNAME/_PASSWORD
        tracker = Tracker(tracker.cfg, uri=without_mask(json.loads(record.read_text()).get("tracking_uri") or ""))
    result = tracker.sync(args.run_dir)
    log.info("replayed %d metric values into run %s at %s", result["replayed"], result["run_id"], tracker.uri)
    return result
