"""Training faults: a hung rank ends the job with an error naming a rank; bad configurations (missing data,
mixed tokenizers, a vocab too small, a changed model shape on resume) are one line, not a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, DataConfig, KilnError
from pipeline.data.sampler import TrainData
from tests.factories import TRAIN_ENV, fake_corpus, kiln_train_cmd

ROOT = Path(__file__).resolve().parent.parent
ENV = TRAIN_ENV
pytestmark = pytest.mark.fault


def kiln_train(out: Path, *sets: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = kiln_train_cmd(out, *sets)
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("kiln train: error:")]


def one_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (line,) = error_lines(res)
    return line


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faultcorpus")
    (base / "sp.model").write_bytes(b"stand-in tokenizer A")
    return fake_corpus(base / "a", vocab_size=128, tokenizer=base / "sp.model")


# --------------------------------------------------------------------------- configuration


def test_missing_data_path_is_one_line(tmp_path):
    res = kiln_train(tmp_path / "out", f"data.paths=[{tmp_path / 'nonexistent'}]")
    line = one_line_error(res, 1)
    assert str(tmp_path / "nonexistent") in line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_corpora_from_different_tokenizers_are_refused(corpus, tmp_path):
    (tmp_path / "other.model").write_bytes(b"stand-in tokenizer B")
    other = fake_corpus(tmp_path / "b", vocab_size=128, seed=3, tokenizer=tmp_path / "other.model")
    with pytest.raises(ConfigError, match="different tokenizers") as err:
        TrainData(DataConfig(paths=[str(corpus), str(other)]), 16, seed=0)
    assert str(corpus) in str(err.value) and str(other) in str(err.value) and "\n" not in str(err.value)
    same = fake_corpus(tmp_path / "c", vocab_size=128, seed=4, tokenizer=corpus.parent / "sp.model")
    assert TrainData(DataConfig(paths=[str(corpus), str(same)]), 16, seed=0).vocab_size == 128


def test_vocab_smaller_than_the_tokenizer_is_one_line(corpus, tmp_path):
    res = kiln_train(tmp_path / "out", f"data.paths=[{corpus}]", "model.vocab_size=100")
    line = one_line_error(res, 2)
    assert "model.vocab_size: 100 is smaller than the tokenizer's 128" in line


@pytest.mark.slow
def test_resume_with_a_changed_model_shape_is_one_line(corpus, tmp_path):
    out = tmp_path / "run"
    res = kiln_train(out, f"data.paths=[{corpus}]", "train.steps=2", "checkpoint.every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    res = kiln_train(out, f"data.paths=[{corpus}]", "train.steps=4", "checkpoint.every=2", "model.n_layer=3")
    line = one_line_error(res, 1)
    assert "step_0000002" in line and "model.n_layer 2 -> 3" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # the checkpoint is left alone
    # the unchanged config still resumes from it
    res = kiln_train(out, f"data.paths=[{corpus}]", "train.steps=3", "checkpoint.every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["resumed_from"].endswith("step_0000002")


# --------------------------------------------------------------------------- a hung rank


def _children_with_rank(parent: int, rank: int, deadline: float) -> int:
    """The pid of the torchrun worker whose environment says RANK=<rank>."""
    while time.time() < deadline:
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} worker under pid {parent}")


def _signalled_or_gone(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` was sent to process `pid` and waits there (a stopped process acts on it when continued),
    or the process is dead already (on a very slow box torchrun's SIGKILL can come first)."""
    try:
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    except FileNotFoundError:
        return True
    return status["State"].split()[0] in ("Z", "X") or bool(int(status["ShdPnd"], 16) >> (sig - 1) & 1)


@pytest.mark.slow
def test_hung_rank_ends_the_job_with_an_error_naming_a_rank(corpus, tmp_path):
    """SIGSTOP rank 1 after the first logged step: rank 0's next collective times out (gloo) and the job ends."""
    timeout_s = 8
    out = tmp_path / "hung"
    cmd = kiln_train_cmd(out, f"data.paths=[{corpus}]", "train.steps=100000", "parallel.zero_stage=1",
                         "checkpoint.every=100000", f"train.collective_timeout_s={timeout_s}", ranks=2)
    log = open(tmp_path / "log.txt", "w+")
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600  # start-up on a loaded box
        rank1 = _children_with_rank(proc.pid, 1, deadline)
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.time()
        while "kiln train: error:" not in (tmp_path / "log.txt").read_text():
            assert time.time() - stopped < 600, "rank 0 still waiting: the collective never timed out"
            time.sleep(0.2)
        waited = time.time() - stopped
        (line,) = [ln for ln in (tmp_path / "log.txt").read_text().splitlines() if "kiln train: error:" in ln]
        assert line.startswith("kiln train: error: rank 0 of 2: a collective got no answer in time"), line
        assert f"train.collective_timeout_s={timeout_s}" in line
        assert waited >= timeout_s * 0.8, waited
        # torchrun notices rank 0's exit and takes the job down: it sends the stopped rank SIGTERM (pending
        # until the rank runs again), would SIGKILL it after a fixed 30 s; continued, it dies now. Exit non-zero
        errored = time.time()
        while not _signalled_or_gone(rank1, signal.SIGTERM):
            assert proc.poll() is None and time.time() - errored < 120, "torchrun never signalled the hung rank"
            time.sleep(0.1)
        os.kill(rank1, signal.SIGCONT)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of the session left over (the stopped rank)
        except ProcessLookupError:
            pass
        log.close()


def test_resume_shape_check_covers_every_model_field(tmp_path):
    """The shape compared on resume is derived from ModelConfig: a checkpoint saved before a field existed
    resumes at its default, and changing the new field (here n_kv_heads) is refused in one line."""
    from pipeline.config import RunConfig
    from pipeline.preflight import check_resume

    old = RunConfig(model={"vocab_size": 128}).model_dump(mode="json")
    old["model"].pop("n_kv_heads")  # as written before grouped-query attention existed
    state = {"config": old, "data_digests": ["d"]}
    check_resume(RunConfig(model={"vocab_size": 128}), tmp_path, state, ["d"])
    check_resume(RunConfig(model={"vocab_size": 128, "n_kv_heads": 12}), tmp_path, state, ["d"])  # = n_head
    with pytest.raises(KilnError, match=r"model.n_kv_heads 12 -> 4\)"):
        check_resume(RunConfig(model={"vocab_size": 128, "n_kv_heads": 4}), tmp_path, state, ["d"])
