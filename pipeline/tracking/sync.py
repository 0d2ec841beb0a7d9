"""`kiln track sync RUN_DIR`: replay the metrics a stage kept writing to RUN_DIR/metrics.jsonl
while the tracking server was unreachable."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Metric

from pipeline.config import KilnError
from pipeline.console import log
from pipeline.tracking.common import METRICS_FILE, RUN_RECORD, is_number, system_tags

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Tracker


def sync(tracker: Tracker, run_dir: str | Path) -> dict:
    """Replay RUN_DIR/metrics.jsonl into the run recorded in RUN_DIR (idempotent: steps
    already present for a key are skipped); create and record a run if none was."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.exists():
        raise KilnError(f"{metrics_path}: not found; nothing to replay")
    record_path = run_dir / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    c = tracker.client
    run_id = record.get("run_id")
    if not run_id:
        run = tracker.strict(str(run_dir), c.create_run, tracker.experiment_id(),
                             run_name=record.get("stage", "replayed"),
                             tags={"kiln.stage": record.get("stage", "replayed"), "kiln.replayed": "true",
                                   **system_tags()})
        run_id = run.info.run_id
        record.update(run_id=run_id, tracking_uri=tracker.uri)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    rows, bad = [], 0
    for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((int(row["step"]), row))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            log.warning("%s:%d: not a metrics record with a step; skipped", metrics_path, n)
    keys = {k for _, row in rows for k, v in row.items() if k != "step" and is_number(v)}
    have = {k: {m.step for m in tracker.strict(run_id, c.get_metric_history, run_id, k)} for k in sorted(keys)}
    now = int(time.time() * 1000)
    todo = [Metric(k, float(v), now, step) for step, row in rows for k, v in row.items()
            if k in keys and is_number(v) and step not in have[k]]
    for i in range(0, len(todo), 1000):
        tracker.strict(run_id, c.log_batch, run_id, metrics=todo[i:i + 1000])
    if record.get("status") in ("FINISHED", "FAILED"):
        if tracker.strict(run_id, c.get_run, run_id).info.status == "RUNNING":
            tracker.strict(run_id, c.set_terminated, run_id, record["status"])
    return {"run_id": run_id, "replayed": len(todo), "skipped_present": sum(len(s) for s in have.values()),
            "bad_lines": bad, "tracking_uri": tracker.uri}
