"""A `kiln prep` output directory's life: what a run may write into (never a finished output of another run,
unless --overwrite, and then beside it until done), its work/ fingerprint, and the temp files a killed process
leaves behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from data_prep import report
from data_prep.config import PrepConfig
from data_prep.errors import KilnError

log = __import__("logging").getLogger("kiln.prep")


@contextmanager
def swept(out: Path):
    """Remove temp files a dead worker or driver left behind (`*.tmp*`), before the run and after it.

    Published names never contain `.tmp`; a killed worker cannot clean up after itself, and its
    retry writes under a new pid-suffixed name.
    """
    def sweep():
        for d in (out / "shards", out / "report", out / "work", out / "work" / "clean", out / "work" / "tok"):
            for p in d.glob("*.tmp*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    sweep()
    try:
        yield
    finally:
        sweep()


def fingerprint(cfg: PrepConfig, inputs: list[dict], tokenizer_sha: str | None, evals: list[dict]) -> str:
    """What the results depend on: config (not the worker count), input contents, a given tokenizer's
    bytes, the evaluation files' contents."""
    conf = cfg.model_dump(mode="json", exclude={"workers", "ray_address", "task_retries", "tracking", "warn_removed_share"})
    blob = json.dumps({"format": report.FORMAT, "config": conf, "tokenizer": tokenizer_sha,
                       "inputs": [(i["rel"], i["sha256"]) for i in inputs],
                       "evals": [(e["source"], e["sha256"]) for e in evals]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def destination(out: Path, fingerprint: str, overwrite: bool) -> Path:
    """Where this run writes: `out`, or beside it when it replaces a finished output (--overwrite), which is
    then swapped in only once the new run has finished. A finished output (manifest.json) of another input,
    config or tokenizer is never deleted otherwise: KilnError."""
    mark = out / "work" / "fingerprint"
    if not (out / "manifest.json").is_file() or (mark.is_file() and mark.read_text() == fingerprint):
        return out  # nothing finished there, or the same run again (it reuses what is done)
    if not overwrite:
        raise KilnError(f"{out}: holds a finished prep of other inputs or config (manifest.json); not replacing it "
                        "(--overwrite replaces it once the new run has finished, or pick another --out)")
    return staging_dir(out)


def staging_dir(out: Path) -> Path:
    """Where `--overwrite` builds (a sibling, so inputs' paths relative to it are the same as to `out`)."""
    return out.parent / f".{out.name}.kiln-new"


def swap_in(staged: Path, out: Path) -> None:
    """Replace `out` with the finished `staged`: two renames, then the old output is deleted."""
    old = out.parent / f".{out.name}.kiln-old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("%s: replaced (--overwrite)", out)


def prepare(out: Path, fingerprint: str) -> Path:
    work = out / "work"
    mark = work / "fingerprint"
    if mark.is_file() and mark.read_text() != fingerprint:
        log.warning("%s: input or config changed since an unfinished run; starting over", out)
        for name in ("work", "shards", "report"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("manifest.json", "tokenizer.model"):
            (out / name).unlink(missing_ok=True)
    (work / "clean").mkdir(parents=True, exist_ok=True)
    (work / "tok").mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "report").mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)
    return work
