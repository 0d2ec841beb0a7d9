"""Where a tracking store keeps its things, and whether one is there at all (no mlflow here).

- Artifacts of a sqlite store live next to its database (`<db dir>/mlruns`), not in whatever
  directory the process happened to start in: `kiln demo --out X` keeps everything under X.
- Read-only commands (lineage, fetch, eval --compare) must not create a store by looking: MLflow
  creates an empty sqlite database (or ./mlruns) on first contact, so they check first and
  name the store they looked in and how to point at the right one.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import KilnError

SQLITE = "sqlite:///"
# Experiments open in the UI's model-training view (MLflow 3 defaults to the GenAI one).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def local_path(uri: str) -> Path | None:
    """The file or directory a local store lives in (sqlite database, file store); None for servers."""
    if uri.startswith(SQLITE):
        return Path(uri[len(SQLITE):])
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to its database; None lets the server/store decide."""
    if uri.startswith(SQLITE):
        return (local_path(uri).resolve().parent / "mlruns").as_uri()
    return None


def require_existing(uri: str) -> None:
    path = local_path(uri)
    if path is None or path.exists():
        return
    raise KilnError(
        f"no MLflow store at {path.resolve()} (tracking URI {uri}); this command only reads and creates none. "
        f"Point it at the store that holds your models: --tracking-uri sqlite:////ABS/PATH/mlflow.db, "
        f"MLFLOW_TRACKING_URI, or tracking.uri in --config (`kiln demo --out X` keeps its store in X/mlflow.db)")
