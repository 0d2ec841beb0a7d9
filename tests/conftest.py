"""Shared fixtures. Tests run on CPU: DeepSpeed uses its cpu accelerator and gloo."""

import os
import types
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed JIT-builds its CPU shared-memory op on first use into TORCH_EXTENSIONS_DIR (default: one
# ~/.cache directory for every venv on the machine). Its build files name this venv's paths, so two
# checkouts would rebuild it for each other (minutes) and a run killed mid-build leaves a lock that
# hangs every later one. Each checkout's tests build it once, in their own venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True, scope="session")
def _isolated_tracking(tmp_path_factory):
    """Stages track to MLflow by default; in tests that must never touch ./mlflow.db."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    yield


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """A random llama MODEL dir with a real tokenizer, its int8 and GPTQ-4 forms (built once per session)."""
    from tests.factories import tiny_model_family

    return tiny_model_family(tmp_path_factory.mktemp("tiny-family"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite MLflow registry (artifacts under its own directory) and a Tracker that writes to it
    (the security tests' shared registry)."""
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("kiln", artifact_location=str(root / "artifacts"))
    return types.SimpleNamespace(root=root, uri=uri, tracker=Tracker(uri=uri, enabled=True))
