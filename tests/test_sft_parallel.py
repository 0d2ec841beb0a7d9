"""`kiln sft` on two processes under ZeRO-2 (Accelerate's DeepSpeed plugin; gloo on CPU), killed -9 as a whole
job right after a checkpoint and rerun, ends with the weights one process reaches on the same global batch:
the gradient is the mean over every learned token of the step (packed rows learn from different numbers of
tokens), the checkpoint holds DeepSpeed's partitioned AdamW state, and the rerun resumes from it."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.model.io import load_model_dir
from tests.factories import ROOT, TRAIN_ENV, launcher

pytestmark = pytest.mark.slow

WORDS = "list string value file module class object function error number line name type method data key".split()
STEPS, KILL_AFTER = 6, 4
SETS = ["train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=2", "data.val_fraction=0", "checkpoint.every=2",
        "checkpoint.keep=2", "tracking.enabled=false", f"train.steps={STEPS}", "train.log_every=1"]

TWO_RANKS = ["train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=2"]

# Loaded by the torchrun workers (LOCAL_RANK set) when KILN_TEST_KILL=STEP: once the checkpoint of STEP is
# complete, the whole job dies as a lost node would (torchrun and every worker, SIGKILL).
HOOK = '''
import os, signal
STEP = os.environ.get("KILN_TEST_KILL")
if STEP and "LOCAL_RANK" in os.environ:
    import pipeline.post.loop as loop

    def save_checkpoint(state, root, step, extra, keep, _save=loop.save_checkpoint):
        path = _save(state, root, step, extra, keep)
        if step == int(STEP):
            open(os.path.join(os.environ["KILN_TEST_KILL_MARKS"], f"killed.rank{os.environ['RANK']}"), "w").close()
            parent = os.getppid()
            for pid in open(f"/proc/{parent}/task/{parent}/children").read().split():
                if int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
            os.kill(parent, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    loop.save_checkpoint = save_checkpoint
'''


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    """Prompts that ask for 1-6 words back: rows of different lengths learn from different numbers of tokens."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("sft-dp") / "chats.jsonl"
    lines = []
    for _ in range(120):
        words = rng.sample(WORDS, rng.randint(1, 6))
        lines.append(json.dumps({"prompt": "repeat: " + " ".join(words), "completion": " ".join(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def two_ranks(base: Path, data: Path, out: Path, kill: int | None = None) -> subprocess.CompletedProcess:
    """`kiln sft` under torchrun, 2 ranks x 2 micro-batches of 2 rows a step, ZeRO-2."""
    hook = out.parent / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**TRAIN_ENV, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "KILN_TEST_KILL_MARKS": str(out.parent)}
    env.pop("KILN_TEST_KILL", None)
    if kill:
        env["KILN_TEST_KILL"] = str(kill)
    sets = [*SETS, *TWO_RANKS]
    cmd = [*launcher(2), "-m", "pipeline.cli", "sft", str(base), "--data", str(data), "--out", str(out), "--json",
           *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, start_new_session=True)


def test_two_zero2_ranks_killed_and_resumed_match_one_process_on_the_same_global_batch(tiny_family, chats, tmp_path):
    from pipeline.sft.train import sft

    base = tiny_family["plain"]
    one = tmp_path / "one"  # 1 process x 1 micro-batch of 8 rows: its loss is the token mean over all 8
    cfg = load_config("sft", None, [*SETS, "train.micro_batch_size=8", "train.grad_accum=1", f"data.paths=[{chats}]"])
    ref = sft(base, cfg, one)

    out = tmp_path / "two"
    killed = two_ranks(base, chats, out, kill=KILL_AFTER)
    assert killed.returncode != 0 and list(tmp_path.glob("killed.rank*")), killed.stderr[-3000:]
    assert not (out / "model").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{KILL_AFTER:07d}"
    assert list((out / "checkpoints" / f"step_{KILL_AFTER:07d}" / "ds").glob("zero_pp_rank_1_*optim_states.pt"))

    done = two_ranks(base, chats, out)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == KILL_AFTER and summary["processes"] == 2
    assert re.search(rf"resuming from .*step_{KILL_AFTER:07d}", " ".join(done.stderr.split()))
    assert summary["tokens_learned"] == ref["tokens_learned"]  # the same global batches

    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, out)]
    assert [m["step"] for m in lines[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*lines, strict=True):
        assert a["tokens"] == b["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6), (a, b)

    want, _ = load_model_dir(one / "model")
    got, _ = load_model_dir(out / "model")
    base_model, _ = load_model_dir(base)
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5, msg=name)
    assert not torch.equal(want.state_dict()["blocks.0.mlp.w2.weight"], base_model.state_dict()["blocks.0.mlp.w2.weight"])

    # its partitioned checkpoint, resumed by one process (no ZeRO there): one line, nothing trained
    from data_prep.errors import KilnError

    same = load_config("sft", None, [*SETS, *TWO_RANKS, f"data.paths=[{chats}]"])
    with pytest.raises(KilnError, match=r"written by 2 process\(es\) with ZeRO; resume it as it was written"):
        sft(base, same, out)


def test_one_process_without_a_launcher_runs_the_plain_loop_at_any_zero_stage(monkeypatch):
    """Nothing to partition over one process: no DeepSpeed (which would look for MPI to make a process group)."""
    from pipeline.config import TrainConfig
    from pipeline.post.zero import accelerator_for, uses_deepspeed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not uses_deepspeed(accelerator_for(TrainConfig(), 2))
