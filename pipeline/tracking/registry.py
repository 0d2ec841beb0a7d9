"""The model registry: models:/ URIs, `kiln register`, `kiln fetch`, the local model cache, eval results.

A MODEL dir is identified across copies and fetches by the digest of its weights
(tag `kiln.weights_sha256`), so registering a directory that was logged before
reuses that LoggedModel instead of uploading a copy.

Registry contents are written by other people: a model id from a tag is only used as a
directory name when it is a plain id, a download is verified file by file (every file listed,
every digest recomputed, nothing outside the directory), and a directory already at `--out` or
in the cache is believed only when its SHA256SUMS is the registered one, byte for byte.

A version's source (its download URI) is written by other people too, and MLflow sends the user's
credentials (MLFLOW_TRACKING_USERNAME/PASSWORD, cloud keys) to wherever it points. So before any
request it must be where this registry's artifacts live (`artifact_store_ok`): the tracking server
itself (`mlflow-artifacts:` or its own scheme://host:port), a local path, or a store the user named
in KILN_ARTIFACT_STORES (comma-separated prefixes, e.g. `s3://team-bucket/mlflow`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException

from pipeline.config import KilnError

MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what mlflow.register_model itself sets on a LoggedModel

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Tracker

PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")  # MLflow's are m-<32 hex>; never a path


@dataclass
class ModelRef:
    """What a models:/ URI points at."""

    uri: str
    model_id: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    download_uri: str | None = None


def file_sha(model_dir: Path, name: str) -> str | None:
    """A file's digest as listed in the MODEL dir's SHA256SUMS (no re-hash of big files)."""
    sums = model_dir / "SHA256SUMS"
    if sums.exists():
        for line in sums.read_text().splitlines():
            digest, _, fname = line.partition("  ")
            if fname.strip() == name:
                return digest
    return None


def weights_sha256(model_dir: Path) -> str:
    """Digest of model.safetensors (or of the index naming its shards, which records their digests): the
    identity of a MODEL dir across copies and fetches."""
    from pipeline.model.io import sha256_file
    from pipeline.model.weights import weights_file

    name = weights_file(model_dir)
    listed = file_sha(model_dir, name)
    if listed:
        return listed
    if not (model_dir / name).exists():
        raise KilnError(f"{model_dir / name}: not found; is {model_dir} a MODEL directory?")
    return sha256_file(model_dir / name)


def resolve(tracker: Tracker, uri: str) -> ModelRef:
    """models:/NAME@ALIAS, models:/NAME/VERSION or models:/<logged model id> -> ModelRef."""
    if not uri.startswith("models:/"):
        raise KilnError(f"{uri}: not a models:/ URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    body = uri[len("models:/"):].strip("/")
    c = tracker.client
    if "@" in body:
        name, alias = body.split("@", 1)
        mv = tracker.strict(uri, c.get_model_version_by_alias, name, alias)
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
        mv = tracker.strict(uri, c.get_model_version, name, version)
    else:
        _plain(uri, body, "the logged model id")
        lm = tracker.strict(uri, c.get_logged_model, body)
        _plain(uri, lm.model_id, "the logged model id")
        return ModelRef(uri, lm.model_id, download_uri=lm.artifact_location)
    model_id = mv.tags.get("kiln.model_id") or getattr(mv, "model_id", None)
    if not model_id:
        raise KilnError(f"{uri}: version {mv.version} was not registered by Kiln (no kiln.model_id tag)")
    _plain(uri, model_id, f"version {mv.version}'s kiln.model_id tag")
    download = tracker.strict(uri, c.get_model_version_download_uri, mv.name, mv.version)
    return ModelRef(uri, model_id, mv.name, str(mv.version), alias, download)


def _plain(uri: str, model_id: str, what: str) -> None:
    """A model id names the cache directory of a fetch: anything but a plain id is refused."""
    if not PLAIN_ID.fullmatch(model_id):
        raise KilnError(f"{uri}: {what} is not a plain model id ([A-Za-z0-9][A-Za-z0-9._-]*, at most 200 "
                        "characters); refusing to use it as a path")


def find_model_by_weights(tracker: Tracker, digest: str) -> str | None:
    """The logged model whose model.safetensors has this digest (how a MODEL dir finds its record)."""
    exps = [e.experiment_id for e in tracker.client.search_experiments()]
    if not exps:
        return None
    found = list(tracker.client.search_logged_models(
        exps, filter_string=f"tags.`kiln.weights_sha256` = '{digest}'", max_results=10))
    pick = [m for m in found if str(m.status).endswith("READY")] or found
    return pick[0].model_id if pick else None


def model_id_for(tracker: Tracker, model: str | Path) -> str | None:
    """A logged model id, models:/ URI or MODEL dir -> logged model id (None if unknown)."""
    text = str(model)
    if text.startswith("models:/"):
        return resolve(tracker, text).model_id
    if text.startswith("m-") and not Path(text).exists():
        return text
    return find_model_by_weights(tracker, weights_sha256(Path(text)))


def register(tracker: Tracker, model_dir: str | Path, name: str, alias: str | None = None,
             stage: str | None = None, parent: str | None = None) -> dict:
    """`kiln register`: reuse the logged model with the same weights, else log one; add a version."""
    from pipeline.model.io import read_config, verify_sums

    if not tracker.enabled:
        raise KilnError("tracking.enabled is false (or RANK is not 0); registering needs MLflow")
    model_dir = Path(model_dir)
    verify_sums(model_dir)  # digests recomputed now: a stale SHA256SUMS must not name other weights
    config = read_config(model_dir)
    existing = tracker.strict(str(model_dir), find_model_by_weights, tracker, weights_sha256(model_dir))
    if existing:
        version = tracker.strict(name, add_version, tracker, existing, name, alias)
        return {"model_id": existing, "name": name, "version": version, "uri": f"models:/{name}/{version}"}
    lineage = config.get("kiln", {})
    stage = stage or lineage.get("stage") or ("quantized" if config.get("quantization") else "pretrain")
    with tracker.stage_run("register", tags={"kiln.model_dir": str(model_dir.resolve())}) as run:
        if run.broken or not run.run_id:
            raise KilnError(f"{model_dir}: could not reach the tracking server at {tracker.uri}")
        recorded, tags = _recorded_parent(tracker, lineage) if parent is None else (None, {})
        info = run.log_model(model_dir, stage=stage, parent=parent or recorded, register_as=name, alias=alias,
                             tags=tags)
    if info is None:
        raise KilnError(f"{model_dir}: registering failed; see the warning above")
    return info


def _recorded_parent(tracker: Tracker, lineage: dict) -> tuple[str | None, dict]:
    """The parent model a MODEL dir's config.json records (kiln.parent_model), never opened: the config is
    whoever wrote the directory's, so a path there is not followed; the parent is found in the registry by
    the weights digest recorded beside it (kiln.parent_sha256), or kept as that digest."""
    named, digest = lineage.get("parent_model"), lineage.get("parent_sha256")
    if isinstance(named, str) and (named.startswith("models:/") or re.fullmatch(r"m-[0-9a-f]{32}", named)):
        return named, {}
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        return None, {}
    found = tracker.strict("kiln.parent_sha256", find_model_by_weights, tracker, digest)
    return found, ({} if found else {"kiln.parent_weights_sha256": digest})


def add_version(tracker: Tracker, model_id: str, name: str, alias: str | None, run_id: str | None = None) -> str:
    """A new version of registered model `name` pointing at a logged model; `alias` moves to it."""
    c = tracker.client
    lm = c.get_logged_model(model_id)
    try:
        c.create_registered_model(name, tags={"kiln": "true"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # Source is the artifact location (not models:/<id>): the sqlite registry resolves
    # models:/ through mlflow's global tracking URI, which a Tracker never sets.
    mv = c.create_model_version(name, source=lm.artifact_location, run_id=run_id or lm.source_run_id,
                                tags={"kiln.model_id": model_id, "kiln.stage": lm.tags.get("kiln.stage", "")},
                                await_creation_for=0, model_id=model_id)
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    # the UI links a logged model to its versions through this tag (else it offers "Register model")
    versions = json.loads(lm.tags.get(MODEL_VERSIONS_TAG) or "[]") + [{"name": name, "version": str(mv.version)}]
    c.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    return str(mv.version)


def fetch(tracker: Tracker, uri: str, out: str | Path) -> dict:
    """Download a registered MODEL dir and verify it (download_verified). Its transformers form is
    pipeline/tracking/forms.py's (forms builds on this module, never the other way round)."""
    return download_verified(tracker, resolve(tracker, uri), out)


def download_verified(tracker: Tracker, ref: ModelRef, out: str | Path) -> dict:
    """Download a registered MODEL dir (streamed), verify it, then move it into place. A directory
    already at `out` is used only when it verifies and its SHA256SUMS is the registered one."""
    from pipeline.model.io import FETCH_MARKER, SUMS, verify_sums

    uri = ref.uri
    out = Path(out)
    if (out / FETCH_MARKER).exists():
        verify_sums(out)
        if (out / SUMS).read_bytes() != _registered_sums(tracker, ref):
            raise KilnError(f"{out}: its files differ from the registered {uri} ({SUMS} is not the registry's); "
                            "delete it or choose another --out")
        return {**asdict(ref), "out": str(out), "cached": True}
    if out.exists() and any(out.iterdir()):
        raise KilnError(f"{out}: exists and is not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_room(ref, _listed(tracker, ref, ref.download_uri), out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        got = Path(_download(tracker, ref, ref.download_uri, tmp))
        verify_sums(got)
        _check_weights_tag(tracker, ref, got)
        (got / FETCH_MARKER).write_text(json.dumps(asdict(ref)) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(got, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**asdict(ref), "out": str(out), "cached": False}


def _registered_sums(tracker: Tracker, ref: ModelRef) -> bytes:
    """The registered copy's SHA256SUMS, downloaded now (a few hundred bytes)."""
    from pipeline.model.io import SMALL_FILE_MAX, SUMS

    size = _listed(tracker, ref, ref.download_uri).get(SUMS, 0)
    if size > SMALL_FILE_MAX:
        raise KilnError(f"{ref.uri}: the registered {SUMS} is {size:,} bytes, more than the {SMALL_FILE_MAX:,}-byte "
                        "limit; refusing it")
    with tempfile.TemporaryDirectory(prefix="kiln-sums-") as tmp:
        got = _download(tracker, ref, f"{ref.download_uri.rstrip('/')}/{SUMS}", tmp)
        return Path(got).read_bytes()


def artifact_store_ok(tracking_uri: str, artifact_uri: str) -> bool:
    """Whether `artifact_uri` is where this registry's artifacts live (see the module docstring)."""
    where, home = urlparse(artifact_uri), urlparse(tracking_uri)
    if where.scheme in ("", "file") and not where.netloc:
        return True  # a local path: no request, no credentials
    if where.scheme == "mlflow-artifacts":  # resolved against the tracking server
        return not where.netloc or (home.scheme in ("http", "https") and _origin(where)[1:] == _origin(home)[1:])
    if where.scheme in ("http", "https") and home.scheme in ("http", "https") and _origin(where) == _origin(home):
        return True
    named = [s.strip().rstrip("/") for s in os.environ.get("KILN_ARTIFACT_STORES", "").split(",") if s.strip()]
    return any(artifact_uri == n or artifact_uri.startswith(n + "/") for n in named)


def _origin(u) -> tuple:
    return (u.scheme, (u.hostname or "").lower(), u.port)


def _check_store(ref: ModelRef, tracker: Tracker, artifact_uri: str) -> None:
    """Before any request: the URI must be this registry's (artifact_store_ok)."""
    if not artifact_store_ok(tracker.connect_uri, artifact_uri):
        scheme = urlparse(artifact_uri).scheme or "a path"
        raise KilnError(f"{ref.uri}: {ref.model_id}'s artifacts are not where this registry keeps its own "
                        f"(a {scheme} URI that is not the tracking server's); refusing to send credentials there "
                        "(name other stores in KILN_ARTIFACT_STORES)")


def _listed(tracker: Tracker, ref: ModelRef, artifact_uri: str, depth: int = 0) -> dict[str, int]:
    """{relative path: size} of the files under `artifact_uri`, as the store lists them (a few requests),
    so that a download's size is known before anything is written."""
    from mlflow.artifacts import list_artifacts

    _check_store(ref, tracker, artifact_uri)
    if depth > 8:
        raise KilnError(f"{ref.uri}: the registered files are nested more than 8 directories deep; refusing them")
    found: dict[str, int] = {}
    for info in tracker.strict(ref.uri, list_artifacts, artifact_uri=artifact_uri, tracking_uri=tracker.connect_uri):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.is_dir:
            inner = _listed(tracker, ref, f"{artifact_uri.rstrip('/')}/{name}", depth + 1)
            found.update({f"{name}/{k}": v for k, v in inner.items()})
        else:
            found[name] = int(info.file_size or 0)
    return found


def _check_room(ref: ModelRef, listed: dict[str, int], where: Path) -> None:
    """The download must fit the free space where it goes (nothing half-written is left: a temp dir)."""
    need, free = sum(listed.values()), shutil.disk_usage(where).free
    if need > free:
        raise KilnError(f"{ref.uri}: the registered files are {need:,} bytes, more than the {free:,} bytes free "
                        f"at {where}; refusing to download them")


def _download(tracker: Tracker, ref: ModelRef, artifact_uri: str, dst) -> str:
    """download_artifacts, once the URI is known to be this registry's (checked before any request)."""
    _check_store(ref, tracker, artifact_uri)
    return tracker.strict(ref.uri, download_artifacts, artifact_uri=artifact_uri, dst_path=str(dst),
                          tracking_uri=tracker.connect_uri)


def _check_weights_tag(tracker: Tracker, ref: ModelRef, got: Path) -> None:
    """The logged model's kiln.weights_sha256 tag (registry metadata) must agree with the downloaded
    artifacts (artifact store): both would have to be changed to swap the weights."""
    from pipeline.model.weights import weights_file

    lm = tracker.strict(ref.uri, tracker.client.get_logged_model, ref.model_id)
    tagged = lm.tags.get("kiln.weights_sha256")
    if tagged and tagged != file_sha(got, weights_file(got)):
        raise KilnError(f"{ref.uri}: the downloaded {weights_file(got)} is not the one logged model {ref.model_id} records "
                        "(kiln.weights_sha256); refusing it")


def materialize(tracker: Tracker, model: str | Path) -> Path:
    """A MODEL dir on disk: the path itself, or a models:/ URI fetched (once) into the cache
    $KILN_CACHE_DIR/models/<model id> (default ~/.cache/kiln)."""
    text = str(model)
    if not text.startswith("models:/"):
        return Path(model)
    ref = resolve(tracker, text)  # a plain id: one directory under the cache, never a path elsewhere
    cache = Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "models" / ref.model_id
    fetch(tracker, text, cache)
    return cache


def attach_eval(tracker: Tracker, model: str | Path, metrics: dict[str, float], split: str,
                data_dir: str | Path | None = None, setup: dict | None = None) -> dict | None:
    """Log eval numbers in an `eval` run, on the logged model, and as tags of its registry version; `setup`
    (device, threads, batch_size: how tokens/s was measured) as the run's params and beside them as tags."""
    if not tracker.enabled:
        return None
    with tracker.stage_run("eval", params={"model": str(model), "split": split, **(setup or {})}) as run:
        if not run.run_id:
            return None
        model_id = run.safe(model_id_for, tracker, model)
        if data_dir is not None:
            run.log_dataset(data_dir, split, context="evaluation")
        run.log_metrics(metrics, step=0, model_id=model_id)
        if model_id:
            run.safe(tracker.client.log_inputs, run.run_id, models=[LoggedModelInput(model_id)])
        if str(model).startswith("models:/") and model_id:
            ref = run.safe(resolve, tracker, str(model))
            if ref and ref.version:
                for key, value in {**metrics, **(setup or {})}.items():
                    run.safe(tracker.client.set_model_version_tag, ref.name, ref.version,
                             f"kiln.eval.{split}.{key}", str(value))
        return {"run_id": run.run_id, "model_id": model_id}
