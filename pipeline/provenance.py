"""Which code produced an artifact: the git commit, shared by checkpoints and MLflow tags.

Kept apart from `pipeline.tracking` so that checkpointing never imports mlflow.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """$KILN_GIT_COMMIT (for installs without a .git), else `git rev-parse HEAD`, else None."""
    if os.environ.get("KILN_GIT_COMMIT"):
        return os.environ["KILN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
