"""Names and small helpers every part of tracking shares (no mlflow here)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig, first_line
from pipeline.provenance import git_commit

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "KILN_PARENT_RUN_ID"
RUN_RECORD = "mlflow_run.json"  # in a stage's RUN_DIR: which run `kiln track sync` writes to
METRICS_FILE = "metrics.jsonl"
PARAM_MAX = 500  # MLflow servers accept 6000; older ones 500, and long values are unreadable anyway
# Fail fast instead of MLflow's default 120 s x 7 retries: tracking must never stall training.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def resolve_uri(cfg: TrackingConfig | None = None, uri: str | None = None) -> str:
    """--tracking-uri, then tracking.uri, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in cwd."""
    return uri or (cfg.uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_sqlite(uri: str) -> str:
    """sqlite:///rel.db is relative to the cwd; a record read from elsewhere needs the absolute path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def system_tags() -> dict[str, str]:
    return {"kiln.git_commit": git_commit() or "unknown", "kiln.host": socket.gethostname(),
            "kiln.world_size": os.environ.get("WORLD_SIZE", "1")}


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err)}"


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
