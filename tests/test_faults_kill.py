"""kill -9 around checkpoint writes, 2 ranks (DP2, ZeRO-1, fp32): one rank or the whole job dies before,
during and after a save; every rerun continues from the newest complete checkpoint (a corrupted one is
skipped), and the run ends bit-identical to one that was never killed."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import newest_complete
from pipeline.model.weights import open_weights
from tests.factories import TRAIN_ENV, fake_corpus, kiln_train_cmd

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.fault, pytest.mark.slow]

# Loaded by every Python process that has this directory first on PYTHONPATH. In torchrun's workers (they
# have LOCAL_RANK), and only when KILN_TEST_KILL="point:step:who" is set, it SIGKILLs rank `who` (or the
# whole job: torchrun and every worker, as a lost node would) at `point` of the checkpoint save of `step`:
#   before   entering save_checkpoint: nothing of this save written yet
#   shard    this rank's DeepSpeed files written under .tmp-step_*, the others' maybe not
#   torn     rank 0 half-way through its weight shard weights/rank_00000.safetensors (cut in two first)
#   renamed  rank 0 after renaming .tmp-step_* to step_*, before moving the `latest` pointer
#   after    save_checkpoint returned: the checkpoint is complete and named by `latest`
HOOK = '''
import os, signal
SPEC = os.environ.get("KILN_TEST_KILL")
if SPEC and "LOCAL_RANK" in os.environ:
    POINT, STEP, WHO = SPEC.split(":")
    RANK = os.environ["RANK"]

    def hit(point, name):
        return point == POINT and int(str(name).strip().rpartition("_")[2]) == int(STEP) and WHO in ("all", RANK)

    def die(point, name):
        if not hit(point, name):
            return
        with open(os.path.join(os.environ["KILN_TEST_KILL_MARKS"], f"{SPEC}.rank{RANK}"), "w"):
            pass  # the proof that this kill happened, and where
        if WHO == "all":
            parent = os.getppid()
            ranks = open(f"/proc/{parent}/task/{parent}/children").read().split()
            os.kill(parent, signal.SIGKILL)
            for pid in ranks:
                os.kill(int(pid), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    import pipeline.checkpoint as checkpoint, pipeline.train as train, pipeline.parallel.engine as engine

    def save_checkpoint(engine_, root, step, state, keep, _save=train.save_checkpoint):
        die("before", step)
        path = _save(engine_, root, step, state, keep)
        die("after", step)
        return path

    def save(self, directory, _save=engine.Engine.save):
        written = _save(self, directory)
        die("shard", directory)
        return written

    def write_shard(path, slices, _write=engine.write_shard):
        sha = _write(path, slices)
        step_dir = os.path.dirname(os.path.dirname(path))
        if hit("torn", step_dir):
            os.truncate(path, os.path.getsize(path) // 2)
            die("torn", step_dir)
        return sha

    def atomic_write(path, text, _write=checkpoint._atomic_write):
        if path.name == "latest":
            die("renamed", text)
        _write(path, text)

    train.save_checkpoint, engine.Engine.save = save_checkpoint, save
    engine.write_shard, checkpoint._atomic_write = write_shard, atomic_write
'''

SETS = ["train.steps=10", "checkpoint.every=2", "checkpoint.keep=2", "train.eval_every=4",
        "parallel.zero_stage=1", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("killcorpus")
    (base / "sp.model").write_bytes(b"stand-in tokenizer")
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(HOOK)
    return fake_corpus(base / "corpus", vocab_size=128, tokenizer=base / "sp.model")


def torchrun(out: Path, corpus: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**TRAIN_ENV, "PYTHONPATH": f"{corpus.parent / 'hook'}{os.pathsep}{ROOT}"}
    env.pop("KILN_TEST_KILL", None)
    if kill:
        env["KILN_TEST_KILL"] = kill
        env["KILN_TEST_KILL_MARKS"] = str(out.parent)
    cmd = kiln_train_cmd(out, f"data.paths=[{corpus}]", *SETS, ranks=2)
    # a new session: when the hook kills torchrun itself, nothing of the job is left attached to pytest
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, start_new_session=True)


def newest(out: Path) -> str | None:
    """What a rerun will resume from, looked up read-only (the rerun itself must clean up)."""
    found = newest_complete(out / "checkpoints")
    return found.name if found else None


def resumed_at(res: subprocess.CompletedProcess) -> int | None:
    """The step in the log line `resumed from DIR (step N, M samples consumed)`, wrapped or not."""
    match = re.search(r"resumed from .*?\(step (\d+), \d+ samples consumed\)", " ".join(res.stderr.split()))
    return int(match.group(1)) if match else None


def test_killed_around_checkpoints_then_rerun_equals_uninterrupted(corpus, tmp_path):
    ref = torchrun(tmp_path / "ref", corpus)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    # (kill spec, what must be on disk right after the kill, the checkpoint the rerun continues from)
    plan = [
        ("before:4:1", lambda: not (ckpts / "step_0000004").exists(), "step_0000002"),
        ("shard:4:all", lambda: (ckpts / ".tmp-step_0000004" / "ds").is_dir(), "step_0000002"),
        ("torn:4:0", lambda: (ckpts / ".tmp-step_0000004" / "weights" / "rank_00000.safetensors").exists(), "step_0000002"),
        ("renamed:4:0", lambda: (ckpts / "latest").read_text().strip() == "step_0000002"
         and (ckpts / "step_0000004" / "SHA256SUMS").exists(), "step_0000004"),
        ("after:6:1", lambda: (ckpts / "latest").read_text().strip() == "step_0000006", "step_0000006"),
    ]
    resume_step = None
    for kill, left, resume_from in plan:
        res = torchrun(out, corpus, kill)
        assert res.returncode != 0, f"{kill}: the job was not killed\n{res.stderr[-2000:]}"
        assert list(tmp_path.glob(f"{kill}.rank*")), f"{kill}: the kill never happened\n{res.stderr[-2000:]}"
        assert resumed_at(res) == resume_step, f"{kill}: this run resumed at {resumed_at(res)}, not {resume_step}"
        assert not (out / "model").exists(), kill
        assert left(), f"{kill}: unexpected state {sorted(p.name for p in ckpts.iterdir())}"
        assert newest(out) == resume_from, kill
        resume_step = int(resume_from.rpartition("_")[2])

    # the newest checkpoint is corrupted on disk as well: its checksum fails, the one before is used
    (ds_file,) = (ckpts / "step_0000006" / "ds").glob("zero_pp_rank_0_*optim_states.pt")
    with open(ds_file, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    done = torchrun(out, corpus)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_at(done) == 4
    assert json.loads(done.stdout.strip().splitlines()[-1])["resumed_from"].endswith("step_0000004")
    assert "unusable" in done.stderr  # the warning

    a, b = open_weights(tmp_path / "ref" / "model").to_dict(), open_weights(out / "model").to_dict()  # one shard per rank
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got_lines] == list(range(1, 11))
    assert [(m["loss"], m.get("val_loss")) for m in got_lines] == [(m["loss"], m.get("val_loss")) for m in ref_lines]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000008", "step_0000010"]
    assert not list(ckpts.glob(".tmp-*"))
