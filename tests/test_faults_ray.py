"""A Ray worker killed (SIGKILL) in the middle of a `kiln prep` task: Ray reruns the task and the run ends
with the digest of a run that never failed; when every attempt dies, one line names the stage and the
unit of work, and rerunning the same command finishes from the work already done."""

from __future__ import annotations

import json
import os
import signal
import textwrap
from pathlib import Path

import psutil
import pytest
import test_prep_e2e as e2e

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.fault
corpus, reference = e2e.corpus, e2e.reference  # its corpus and fault-free run, on this module's `ray_local`

# Loaded at start-up by every Python process with this directory first on PYTHONPATH; acts only in Ray's
# task workers and only while KILN_TEST_KILL_DIR is set. Armed by KILN_TEST_KILL_DIR/plan.json
# ({"targets": [...], "times": n, "out": DIR}), an armed task kills its own worker with SIGKILL part-way
# through, at most n times per target: each kill first creates TARGET.killK with O_CREAT|O_EXCL (so two
# attempts never both count) holding what the task had done so far.
SITECUSTOMIZE = textwrap.dedent('''
    import os
    import sys

    ARM = os.environ.get("KILN_TEST_KILL_DIR")
    if ARM and sys.argv and sys.argv[0].endswith("default_worker.py"):
        import json
        import signal
        from pathlib import Path

        import data_prep.buckets
        import data_prep.indexed
        import data_prep.stages

        def _die_if_armed(target, evidence):
            try:
                plan = json.loads(Path(ARM, "plan.json").read_text())
            except FileNotFoundError:
                return
            if target not in plan["targets"]:
                return
            for k in range(1, plan["times"] + 1):
                try:
                    fd = os.open(Path(ARM, f"{target}.kill{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    continue
                os.write(fd, json.dumps(dict(evidence(plan["out"]), pid=os.getpid())).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)

        _read_partition = data_prep.stages.read_partition

        def read_partition(part, *args, **kwargs):
            """clean+filter: die after three records of the partition went through the steps."""
            for n, rec in enumerate(_read_partition(part, *args, **kwargs), 1):
                yield rec
                if n == 3:
                    name = f"{part['index']:05d}"
                    tmp = lambda out: Path(out, "work", "clean", f"{name}.tmp{os.getpid()}")  # noqa: E731
                    _die_if_armed(f"clean-{name}", lambda out: {"records_read": n, "tmp_files": sorted(os.listdir(tmp(out)))})

        data_prep.stages.read_partition = read_partition
        _add_many = data_prep.indexed.IndexedWriter.add_many

        def add_many(self, docs):
            """tokenize: die right after the first documents were written to a shard's .bin.tmp."""
            _add_many(self, docs)
            self._bin.flush()
            _die_if_armed(f"tokenize-{self.prefix.name}",
                          lambda out: {"bin_tmp_bytes": os.path.getsize(self._bin_tmp), "documents": len(self.sizes),
                                       "published": self.bin_path.exists()})

        data_prep.indexed.IndexedWriter.add_many = add_many
        _dedup_bucket = data_prep.buckets.dedup_bucket

        def dedup_bucket(bucket, *args, **kwargs):
            """dedup: die with the bucket's groups computed but not yet handed back."""
            result = _dedup_bucket(bucket, *args, **kwargs)
            _die_if_armed(f"dedup-{bucket}", lambda out: {"exact_duplicates": len(result["exact"][0])})
            return result

        data_prep.buckets.dedup_bucket = dedup_bucket
''')


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the module (the reference run too) whose workers load the kill switch; yields its dir."""
    import ray

    here = tmp_path_factory.mktemp("raykill")
    (here / "sitecustomize.py").write_text(SITECUSTOMIZE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", f"{here}{os.pathsep}{ROOT}")
        mp.setenv("KILN_TEST_KILL_DIR", str(here))
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False)
        try:
            yield here
        finally:
            ray.shutdown()


def _arm(switch: Path, out: Path, targets: list[str], times: int) -> None:
    (switch / "plan.tmp").write_text(json.dumps({"targets": targets, "times": times, "out": str(out)}))
    os.replace(switch / "plan.tmp", switch / "plan.json")


def _kills(switch: Path, target: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(switch.glob(f"{target}.kill*"))]


def _args(corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return [*e2e.cli_args(corpus_dir, out, workers=2), "--set", "tracking.enabled=false", *extra, "--json"]


def _no_temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def _train_shard(ref_out: Path, pick) -> str:
    shards = [sh for sh in json.loads((ref_out / "manifest.json").read_text())["shards"] if sh["split"] == "train"]
    return Path(pick(shards)["path"]).name.removesuffix(".bin")


@pytest.mark.slow
def test_worker_killed_mid_task_is_retried_and_digest_is_unchanged(ray_local, reference, corpus, tmp_path, capsys):
    from pipeline.cli import main

    ref_out, ref = reference
    out = tmp_path / "killed"
    shard = _train_shard(ref_out, lambda shards: max(shards, key=lambda sh: sh["documents"]))
    _arm(ray_local, out, ["clean-00001", "dedup-0", f"tokenize-{shard}"], times=1)
    try:
        assert main(_args(corpus[0], out)) == 0
    finally:
        (ray_local / "plan.json").unlink()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # a worker really died in the middle of each task: after reading input / computing a dedup bucket /
    # writing shard bytes
    [clean_kill] = _kills(ray_local, "clean-00001")
    assert clean_kill["records_read"] == 3 < json.loads((out / "work/clean/00001/stats.json").read_text())["records"]
    assert {"docs.jsonl", "quarantine.jsonl", "removed.jsonl"} <= set(clean_kill["tmp_files"])
    assert len(_kills(ray_local, "dedup-0")) == 1  # a bucket's groups were computed, the worker died before returning
    [tok_kill] = _kills(ray_local, f"tokenize-{shard}")
    assert tok_kill["bin_tmp_bytes"] > 0 and tok_kill["documents"] > 0 and not tok_kill["published"]

    # ...and the retries give exactly the result of a run that never failed
    assert summary["digest"] == ref["digest"]
    assert summary["counts"] == ref["counts"]
    for report in ("removed.jsonl", "quarantine.jsonl"):
        assert (out / "report" / report).read_bytes() == (ref_out / "report" / report).read_bytes()
    assert not _no_temp_files(out)  # the dead worker's half-written partition was swept


@pytest.mark.slow
def test_retries_exhausted_is_one_line_then_rerun_finishes(ray_local, reference, corpus, tmp_path, capsys):
    from pipeline.cli import main

    ref_out, ref = reference
    out = tmp_path / "exhausted"
    shard = _train_shard(ref_out, lambda shards: shards[-1])
    part = int(shard.split("_")[1])
    _arm(ray_local, out, [f"tokenize-{shard}"], times=2)
    try:
        assert main(_args(corpus[0], out, "--set", "task_retries=1")) == 1
    finally:
        (ray_local / "plan.json").unlink()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("kiln prep: error:")]
    assert len(lines) == 1, err[-3000:]
    rel = json.loads((out / "work/clean" / f"{part:05d}/stats.json").read_text())["rel"]
    assert f"tokenize: shards/{{train,val}}_{part:05d} from {rel} " in lines[0]
    assert f"(partition {part})" in lines[0] and "task_retries=1" in lines[0]
    assert "Traceback" not in err
    assert len(_kills(ray_local, f"tokenize-{shard}")) == 2  # the first attempt and its one retry
    assert not (out / "manifest.json").exists()
    assert not _no_temp_files(out)

    # the same command, the fault gone: finishes with the reference digest, reusing what was done
    done = {p: p.stat().st_mtime_ns for p in [*out.glob("work/clean/*/stats.json"), out / "work/dedup.json",
                                              out / "work/tokenizer.model", *out.glob("work/tok/*.json")]}
    assert main(_args(corpus[0], out)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["digest"] == ref["digest"] and summary["counts"] == ref["counts"]
    assert {p: p.stat().st_mtime_ns for p in done} == done
    assert len(_kills(ray_local, f"tokenize-{shard}")) == 2


@pytest.mark.slow
def test_a_stage_stops_its_other_tasks_when_one_fails(ray_local, tmp_path):
    """After a task fails for good, its siblings are cancelled, so none still writes when a rerun starts."""
    import time

    import ray

    from data_prep.runner import _run_tasks
    from pipeline.config import KilnError

    def work(i: int, d: str) -> int:  # defined here, so Ray ships it by value
        if i == 1:
            Path(d, "started").write_text(str(os.getpid()))
            time.sleep(60)
            Path(d, "finished").touch()
        deadline = time.time() + 30
        while not Path(d, "started").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(KilnError) as err:
        _run_tasks(ray, work, [(0, str(tmp_path)), (1, str(tmp_path))], e2e.config(workers=2, task_retries=0),
                   "stage", ["unit zero", "unit one"])
    assert str(err.value).startswith("stage: unit zero: its Ray worker process died") and "task_retries=0" in str(err.value)
    # the sibling's worker was killed, not left to finish its 60 s sleep (no wall-clock bound on a busy box:
    # the process is gone, so it can never write)
    sibling = int((tmp_path / "started").read_text())
    deadline = time.time() + 30
    while psutil.pid_exists(sibling) and psutil.Process(sibling).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the sibling task is still running after the stage failed"
        time.sleep(0.1)
    assert not (tmp_path / "finished").exists()
