"""Disk full while writing shards: a one-line error naming the shard, nothing half-written under a final
name, and after space is freed the same command finishes with the digest of a run that never failed."""

from __future__ import annotations

import errno
import inspect
import json
import os
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_prep import indexed
from data_prep.indexed import IndexedDataset, IndexedWriter
from pipeline.config import KilnError, PrepConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.fault

class _FullDisk:
    """A file that takes `budget` bytes and then fails like a full disk (only while `flag` exists, if given)."""

    def __init__(self, f, budget: int, flag: str | None = None):
        self.f, self.left, self.flag = f, budget, flag

    def write(self, data):
        if self.flag is None or os.path.exists(self.flag):
            self.left -= len(data)
            if self.left < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


# Loaded by every Python process started with this directory on PYTHONPATH (so by Ray's workers): while the
# flag file exists, shard files stop accepting bytes after a budget, as a full disk would. It carries the
# source of _FullDisk above, so the in-process and the Ray-worker tests fail writes the same way.
SITECUSTOMIZE = "import builtins, errno, os\n\n" + inspect.getsource(_FullDisk) + textwrap.dedent('''
    FLAG = os.environ.get("KILN_TEST_DISK_FULL_FLAG")
    if FLAG:
        def _open(file, mode="r", *args, **kwargs):
            f = builtins.open(file, mode, *args, **kwargs)
            if "w" in mode and (".bin.tmp" in str(file) or ".idx.tmp" in str(file)):
                return _FullDisk(f, int(os.environ["KILN_TEST_DISK_FULL_BYTES"]), FLAG)
            return f
        import data_prep.indexed
        data_prep.indexed.open = _open
''')


@pytest.mark.parametrize("fail_in", ["bin", "idx"])
def test_writer_on_a_full_disk_leaves_nothing_and_names_the_shard(tmp_path, monkeypatch, fail_in):
    def full_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if "w" in mode and f".{fail_in}.tmp" in str(file):
            return _FullDisk(f, 1000)
        return f

    monkeypatch.setattr(indexed, "open", full_open, raising=False)
    docs = [np.arange(3, 3 + (i % 50) + 1) for i in range(300 if fail_in == "bin" else 200)]
    with pytest.raises(KilnError) as err:
        with IndexedWriter(tmp_path / "shards" / "train_00007", np.uint16) as w:
            for d in docs:
                w.add(d)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / "shards" / "train_00007"))
    assert "No space left on device" in msg
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == []  # no .tmp, no final name


def _corpus(directory: Path) -> Path:
    words = "river stone bridge market harbour lantern garden window winter summer baker kettle".split()
    directory.mkdir()
    for k in range(3):
        rng = random.Random(k)
        with open(directory / f"part{k}.jsonl", "w") as f:
            for i in range(40):
                f.write(json.dumps({"id": f"{k}-{i}", "text": " ".join(rng.choice(words) for _ in range(80))}) + "\n")
    return directory


def _cfg() -> PrepConfig:
    return PrepConfig(vocab_size=300, val_fraction=0.1, shard_docs=20, workers=2, near_dedup=False,
                      filters=[],
                      tracking={"enabled": False})


@pytest.fixture(scope="module")
def ray_with_fault(tmp_path_factory):
    """A local Ray whose workers load the disk-full switch; yields the flag file that turns it on."""
    import ray

    here = tmp_path_factory.mktemp("fault")
    (here / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = here / "disk_full"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "KILN_TEST_DISK_FULL_FLAG", "KILN_TEST_DISK_FULL_BYTES")}
    os.environ.update(PYTHONPATH=f"{here}{os.pathsep}{ROOT}", KILN_TEST_DISK_FULL_FLAG=str(flag),
                      KILN_TEST_DISK_FULL_BYTES="2000")
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
        yield flag
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_prep_on_a_full_disk_fails_cleanly_then_resumes(ray_with_fault, tmp_path, capsys):
    from data_prep.runner import prep
    from pipeline.cli import main

    flag = ray_with_fault
    corpus = _corpus(tmp_path / "corpus")
    clean = prep([str(corpus)], tmp_path / "clean", _cfg())

    out = tmp_path / "full"
    flag.touch()  # the disk is full from now on
    args = ["prep", str(corpus), "--out", str(out), "--workers", "2", "--vocab-size", "300", "--val-fraction", "0.1",
            "--set", "shard_docs=20", "--set", "near_dedup=false", "--set", "filters=[]",
            "--set", "tracking.enabled=false", "--json"]
    assert main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1, err
    assert f"{out / 'shards'}/train_0000" in err[0] and "cannot write shard: No space left on device" in err[0]
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("shards/*.tmp"))
    for idx in out.glob("shards/*.idx"):  # whatever has a final name is a whole shard
        IndexedDataset(idx.with_suffix(""))
    assert {p.stem for p in out.glob("shards/*.bin")} == {p.stem for p in out.glob("shards/*.idx")}
    assert len(list(out.glob("shards/train_*.bin"))) < 6  # the failing shards are not there

    flag.unlink()  # space freed: the same command finishes, with the clean run's result
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["digest"] == clean["digest"] and summary["counts"] == clean["counts"]
    assert len(list(out.glob("shards/train_*.bin"))) == 6
