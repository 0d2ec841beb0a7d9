"""Credentials never leave the process: URIs are redacted wherever Kiln prints or stores them.

A tracking URI may carry `user:password@` (`--tracking-uri`, `$MLFLOW_TRACKING_URI`); Kiln connects
with it as given and shows `scheme://***@host` everywhere else: errors, warnings, `--json`, run
records on disk. MLflow's own messages quote the URLs it called, so whole texts are scrubbed, not
only the URIs Kiln formats. Configs are stored with runs (params, checkpoints, manifests), so a
config may not hold credentials at all (pipeline/config.py refuses them); MLflow reads them from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN).
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_SECRET_PARAM = re.compile(r"([?&](?:access_token|token|password|secret|sig|signature)=)[^&\s]+", re.I)
MASK = "***"


def redact(text: str) -> str:
    """`text` with the user:password of every URI in it, and token-like query values, masked."""
    return _SECRET_PARAM.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text))


def has_credentials(uri: str) -> bool:
    return redact(uri) != uri


def without_mask(uri: str) -> str:
    """A redacted URI read back from a run record, as a URI to connect to (credentials then come
    from the environment)."""
    return uri.replace(f"://{MASK}@", "://")
