"""bench/time_to_quality.py: the crossing it reports, nanoGPT's schedule, bad input, and one tiny run end to end
(nanoGPT in process, `kiln train` as a subprocess, both scored by pipeline/evaluate.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_tracking_support import text_corpus, train_tokenizer

from bench.time_to_quality import check_data, main, nanogpt_lr, time_to_reach
from pipeline.config import KilnError
from tests.factories import TINY_TRAIN, TRAIN_ENV, fake_corpus

ROOT = Path(__file__).resolve().parent.parent


def _curve(*losses: float) -> list[dict]:
    return [{"val_loss": v, "train_s": 10.0 * (i + 1), "tokens": 100 * (i + 1)} for i, v in enumerate(losses)]


def test_time_to_reach_interpolates_between_the_evals_around_the_first_crossing():
    curve = _curve(5.0, 4.0, 3.0, 2.5)
    assert time_to_reach(curve, 3.8, "train_s") == pytest.approx((22.0, 30.0))  # 20 + 0.2 x (30 - 20)
    assert time_to_reach(curve, 3.8, "tokens") == pytest.approx((220.0, 300.0))
    assert time_to_reach(curve, 4.0, "train_s") == (20.0, 20.0)  # an eval exactly at the target reaches it
    assert time_to_reach(curve, 6.0, "train_s") == (10.0, 10.0)  # already the first eval: its own time
    assert time_to_reach(curve, 2.0, "train_s") == (None, None)  # never
    # the first crossing counts, not a later one after a bump
    assert time_to_reach(_curve(5.0, 3.0, 4.5, 2.0), 4.0, "train_s") == pytest.approx((15.0, 20.0))


def test_nanogpt_schedule_is_its_train_py_get_lr():
    assert nanogpt_lr(0, 300) == pytest.approx(1e-3 / 101)
    assert nanogpt_lr(99, 300) == pytest.approx(1e-3 * 100 / 101)
    assert nanogpt_lr(100, 300) == pytest.approx(1e-3)
    assert nanogpt_lr(200, 300) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way through the cosine
    assert nanogpt_lr(300, 300) == pytest.approx(1e-4) == nanogpt_lr(301, 300)


@pytest.mark.fault
def test_bad_input_is_one_line(tmp_path, capsys):
    data = fake_corpus(tmp_path / "c", vocab_size=64)
    with pytest.raises(KilnError, match=r"manifest.json: the val split holds \d+ windows of 32 tokens; "
                                        r"--eval-windows 1000 needs more"):
        check_data(data, {"block_size": 32}, 1000)
    with pytest.raises(SystemExit, match="--recipe .*nope.yaml: not found"):
        main(["--recipe", str(tmp_path / "nope.yaml"), "--data", str(data)])
    with pytest.raises(SystemExit, match=r"^time_to_quality: .*manifest.json: the val split holds \d+ windows of 256"):
        main(["--recipe", str(TINY_TRAIN), "--data", str(data), "--work", str(tmp_path / "w")])


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    """`python -m bench time_to_quality` at a tiny shape: both curves at the eval cadence, Kiln at 60% of the
    steps and the same tokens per step, the reported crossing recomputed from the curves, JSON line and PNG."""
    corpus = text_corpus(tmp_path / "corpus", train_tokenizer(tmp_path / "tok"), n_docs=40, val_docs=4)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "time_to_quality", "--steps", "10", "--evals", "5", "--eval-windows", "4",
           "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch", "4",
           "--recipe", str(TINY_TRAIN), "--data", str(corpus), "--work", str(tmp_path / "work"),
           "--results", str(results)]
    res = subprocess.run(cmd, env=TRAIN_ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert json.loads((results / "time_to_quality.jsonl").read_text().splitlines()[-1]) == record
    assert (results / "time_to_quality_N10.png").stat().st_size > 0
    nano, kiln = record["curves"]["nanogpt"], record["curves"]["kiln"]
    assert [p["step"] for p in nano] == [2, 4, 6, 8, 10] and [p["step"] for p in kiln] == [2, 4, 6]
    assert record["kiln_steps"] == 6 and all(p["tokens"] == p["step"] * 4 * 32 for p in nano + kiln)
    for curve in (nano, kiln):  # the clock: each interval's tokens at that interval's training tokens/s
        for a, b in zip([{"tokens": 0, "train_s": 0.0}, *curve], curve, strict=False):
            assert b["train_s"] - a["train_s"] == pytest.approx((b["tokens"] - a["tokens"]) / b["tokens_per_s"])
            assert b["train_s"] > a["train_s"]
        assert all(math.isfinite(p["val_loss"]) and p["val_bpb"] > 0 for p in curve)
    target = nano[-1]["val_loss"]
    assert record["target_val_loss"] == target and record["reference"] == round(nano[-1]["train_s"], 2)
    reach, first = time_to_reach(kiln, target, "train_s")
    assert record["reached"] == (reach is not None) and record["kiln_first_eval_at_target_s"] == (first if first is None else round(first, 2))
    if reach is not None:
        assert record["value"] == round(reach, 2) and record["ratio"] == round(reach / nano[-1]["train_s"], 4)
    assert record["shape"] == {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch": 4,
                               "vocab_size": 400}
    assert "train.steps=6" in record["kiln_overrides"] and record["machine"]["cores"]
