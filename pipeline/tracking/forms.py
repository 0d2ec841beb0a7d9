"""The transformers form of a registered model, registered alongside Kiln's.

A registered Kiln MODEL dir (`NAME`, version v, alias a) gets a second LoggedModel holding its
transformers form (pipeline/hf/model.py: plain, torchao int8 or packed GPTQ), registered as a
version of `NAME-hf` under the same alias, so plain MLflow users can download
`models:/NAME-hf@a` and `from_pretrained` it. Both sides point at each other
(`kiln.hf_model_id` on the Kiln model and version, `kiln.kiln_model_id` on the HF model);
`kiln fetch --format hf models:/NAME@a` follows that link, or converts the Kiln form locally
when a version has none (registered before, or its kind has no transformers form).

A logged model's tags can be changed by anyone with rights on its experiment, so the link is
believed only when the registry agrees both ways (`hf_ref`): version v of NAME carries the same
kiln.hf_model_id, and a version of NAME-hf registers that HF model, which names this Kiln model back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import KilnError
from pipeline.console import log

if TYPE_CHECKING:
    from pipeline.tracking.registry import ModelRef
    from pipeline.tracking.runs import StageRun
    from pipeline.tracking.tracker import Tracker

HF_SUFFIX = "-hf"
LINK = "kiln.hf_model_id"


def hf_name(name: str) -> str:
    return name + HF_SUFFIX


def log_hf_form(run: StageRun, model_dir: Path, kiln_info: dict, tags: dict, alias: str | None) -> dict | None:
    """Convert `model_dir`, log the result as its own LoggedModel, register it as NAME-hf; None (with
    a warning) when this kind of model has no transformers form."""
    from pipeline.hf.model import export_model_dir
    from pipeline.tracking.registry import add_version, weights_sha256

    t = run.tracker
    with _scratch(model_dir) as tmp:
        out = Path(tmp) / "hf"
        try:
            export_model_dir(model_dir, out)
        except (KilnError, ImportError, ValueError, RuntimeError, OSError) as err:
            log.warning("%s: no transformers form registered (%s)", model_dir, str(err).splitlines()[0])
            return None
        name = hf_name(kiln_info["name"])
        own = {"kiln.form": "hf", "kiln.kiln_model_id": kiln_info["model_id"], "kiln.weights_sha256": weights_sha256(out)}
        lm = run.safe(t.client.create_logged_model, t.experiment_id(), name=name, source_run_id=run.run_id,
                      tags={**tags, **own}, model_type="transformers")
        if lm is None or run.safe(t.client.log_model_artifacts, lm.model_id, str(out)) is None and run.broken:
            return None
    run.safe(t.client.finalize_logged_model, lm.model_id, "READY")
    run.log_output_model(lm.model_id)
    version = run.safe(add_version, t, lm.model_id, name, alias, run.run_id)
    run.safe(t.client.set_logged_model_tags, kiln_info["model_id"], {LINK: lm.model_id})
    if kiln_info.get("version"):
        run.safe(t.client.set_model_version_tag, kiln_info["name"], kiln_info["version"], LINK, lm.model_id)
    return {"model_id": lm.model_id, "name": name, "version": version, "uri": f"models:/{name}/{version}"}


def _scratch(model_dir: Path) -> tempfile.TemporaryDirectory:
    """A temp dir next to the model (same filesystem, room for its size), else the system's."""
    try:
        return tempfile.TemporaryDirectory(prefix=".kiln-hf-", dir=model_dir.parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="kiln-hf-")


def hf_ref(tracker: Tracker, ref: ModelRef) -> ModelRef | None:
    """The registered transformers form of `ref`, if one was registered with it (checked both ways
    through the registry; KilnError when the tags disagree with it)."""
    from pipeline.tracking.registry import ModelRef, _plain

    c = tracker.client
    linked = tracker.strict(ref.uri, c.get_logged_model, ref.model_id).tags.get(LINK)
    if not linked or not ref.version:
        return None  # no link, or no registry version to check one against: the Kiln form is converted
    mv = tracker.strict(ref.uri, c.get_model_version, ref.name, ref.version)
    hf_name_ = hf_name(ref.name)
    ok = mv.tags.get(LINK) == linked
    if ok:
        _plain(ref.uri, linked, f"version {ref.version}'s {LINK} tag")
        hf = tracker.strict(ref.uri, c.get_logged_model, linked)
        back = tracker.strict(ref.uri, c.search_model_versions, f"name = '{hf_name_}'")
        ok = (hf.tags.get("kiln.kiln_model_id") == ref.model_id
              and any(v.tags.get("kiln.model_id") == linked for v in back))
    if not ok:
        raise KilnError(f"{ref.uri}: the transformers form linked from logged model {ref.model_id} ({LINK}) is not "
                        f"the one the registry records for version {ref.version} and {hf_name_}; refusing the link")
    return ModelRef(ref.uri, hf.model_id, ref.name, ref.version, ref.alias, hf.artifact_location)


def fetch_hf(tracker: Tracker, uri: str, out: str | Path) -> dict:
    """`kiln fetch --format hf`: the registered transformers form, else the Kiln form converted here."""
    from pipeline.hf.model import export_model_dir
    from pipeline.tracking.registry import download_verified, resolve

    ref = resolve(tracker, uri)
    linked = hf_ref(tracker, ref)
    if linked is not None:
        return {**download_verified(tracker, linked, out), "format": "hf", "converted": False}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        kiln = download_verified(tracker, ref, tmp / "kiln")
        export_model_dir(tmp / "kiln", tmp / "hf")
        if out.exists() and any(out.iterdir()):
            raise KilnError(f"{out}: exists and is not empty; choose another --out")
        if out.exists():
            out.rmdir()
        shutil.move(str(tmp / "hf"), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**kiln, "out": str(out), "format": "hf", "converted": True}
