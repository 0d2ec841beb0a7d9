"""Issue 15: bf16 trains with fp32 master weights and fp32 gradient sums (every ZeRO stage and PP), and with one
micro-batch a step keeps only its partition of the gradients, in bf16 (issue 26); the training loop reads device
values (a host sync) on log steps only; the global batch is stated in tokens."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, build, grad_accum, load_config
from pipeline.parallel.engine import ds_config
from tests.factories import ROOT, TINY_TRAIN, TRAIN_ENV, fake_corpus, launcher

PROBE = str(Path(__file__).with_name("engine_probe.py"))


def probe(*args: str, ranks: int = 1) -> list[dict]:
    res = subprocess.run([*launcher(ranks), PROBE, *args], env=TRAIN_ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> list[dict]:
    """The single-process probes, run in one process: ZeRO stages 1-3 in bf16, then 6 steps of training."""
    tmp = tmp_path_factory.mktemp("probe")
    corpus = fake_corpus(tmp / "corpus", vocab_size=128)
    return probe("accum", "1", "2", "3", "+", "syncs", str(tmp / "run"), str(corpus))


@pytest.mark.slow
def test_bf16_sums_gradients_in_fp32_at_every_zero_stage(one_rank):
    got = {r["stage"]: r for r in one_rank if "stage" in r}
    assert sorted(got) == [1, 2, 3]
    assert {s: got[s]["optimizer"] for s in got} == {
        1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}
    for r in got.values():  # bf16 weights; what 2 micro-batches left in the accumulation buffers is fp32
        assert r["param_dtype"] == "torch.bfloat16"
        assert r["grad_dtypes"] == ["torch.float32"] and r["grads"] == r["params"] and r["nonzero"], r


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """The 2-rank probes in one process group: PP=2 in bf16, then bf16 at one micro-batch a step."""
    return probe("pipe", "+", "partition", ranks=2)


@pytest.mark.slow
def test_bf16_pipeline_parallel_uses_the_fp32_master_optimizer(two_ranks):
    (r,) = [r for r in two_ranks if "loss" in r]
    assert r["optimizer"] == "BF16_Optimizer" and r["grad_dtypes"] == ["torch.float32"], r
    assert 0 < r["loss"] < 10


@pytest.mark.slow
def test_bf16_at_one_micro_batch_keeps_half_the_gradients_in_bf16_per_rank(two_ranks):
    """With nothing to sum over micro-batches, no fp32 gradient buffer (BF16_Optimizer's was the whole model's
    per rank): after backward each of 2 ranks holds exactly its partition of the gradients, in bf16, at stage 1
    and 2; and DeepSpeed's synchronizing throughput timer is off."""
    rows = [r for r in two_ranks if "partition_stage" in r]
    assert sorted((r["partition_stage"], r["rank"]) for r in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in rows:
        assert r["optimizer"] == "DeepSpeedZeroOptimizer" and r["grad_dtypes"] == ["torch.bfloat16"], r
        assert r["grad_elements"] == r["partition"] <= -(-r["params"] // 2) + 64, r  # (DeepSpeed pads a little)
        assert r["fp32_accum_buffers"] == 0 and r["throughput_timer"] is False, r


def test_ds_config_asks_for_fp32_sums_and_overlap():
    cfg = load_config("train", TINY_TRAIN, ["parallel.zero_stage=1", "train.precision=bf16", "train.grad_accum=2"])
    on_gpu, on_cpu = ds_config(cfg, 2, gpu=True), ds_config(cfg, 2)
    assert on_gpu["data_types"] == {"grad_accum_dtype": "fp32"} and on_gpu["communication_data_type"] == "fp32"
    assert on_gpu["zero_optimization"]["overlap_comm"] and not on_cpu["zero_optimization"]["overlap_comm"]
    assert on_gpu["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    one = ds_config(load_config("train", TINY_TRAIN, ["parallel.zero_stage=1", "train.precision=bf16",
                                                      "train.grad_accum=1"]), 2, gpu=True)
    assert one["data_types"] == {"grad_accum_dtype": "bf16"} and one["communication_data_type"] == "fp32"
    fp32 = ds_config(load_config("train", TINY_TRAIN, []), 1, gpu=True)
    assert "data_types" not in fp32 and not fp32["zero_optimization"]["overlap_comm"]  # stage 0: nothing to overlap


def test_zero_stage_0_refuses_bf16_in_one_line():
    with pytest.raises(ConfigError, match="parallel.zero_stage: 0 with bf16 would sum and reduce gradients in bf16"):
        load_config("train", TINY_TRAIN, ["train.precision=bf16"])


@pytest.mark.slow
def test_the_loop_reads_device_values_on_log_steps_only(one_rank):
    (r,) = [r for r in one_rank if "syncs_after_step" in r]
    syncs = r["syncs_after_step"]
    assert len(syncs) == 6 and syncs[:2] == syncs[3:5] == [0, 0], syncs  # log_every 3: steps 3 and 6 only
    assert 1 <= syncs[2] <= 2 and 1 <= syncs[5] <= 2, syncs  # the loss (+ the grad norm)


def _cfg(*sets: str) -> RunConfig:
    return load_config("train", ROOT / "configs/train/1.3b-2x8.yaml", list(sets))


def test_global_batch_in_tokens_is_the_same_at_every_world_size():
    cfg = _cfg()
    tokens = cfg.train.global_batch_tokens
    for dp, accum in [(16, 4), (8, 8), (4, 16), (1, 64)]:
        assert grad_accum(cfg, dp) == accum
        assert accum * cfg.train.micro_batch_size * cfg.model.block_size * dp == tokens
    with pytest.raises(ConfigError, match=r"train.global_batch_tokens: 1,048,576 is not a multiple of micro_batch_size 8 "
                                          r"x block_size 2048 x dp 3 = 49,152 tokens"):
        grad_accum(cfg, 3)
    assert grad_accum(_cfg("train.grad_accum=4"), 16) == 4  # both given and agreeing
    with pytest.raises(ConfigError, match=r"train.grad_accum: 2 disagrees with train.global_batch_tokens"):
        grad_accum(_cfg("train.grad_accum=2"), 16)
    pipe = _cfg("parallel.pp=2", "parallel.micro_batches=3")
    with pytest.raises(ConfigError, match=r"parallel.micro_batches: 3 disagrees"):
        grad_accum(pipe, 8)
    old = build(RunConfig, {"train": {"grad_accum": 3}})  # configs without global_batch_tokens: as before
    assert grad_accum(old, 16) == 3 and grad_accum(build(RunConfig, {}), 16) == 1
    assert ds_config(cfg, 8)["gradient_accumulation_steps"] == 8 and ds_config(cfg, 8)["train_batch_size"] == 512


def test_launch_and_train_check_the_global_batch_against_the_world():
    """validate_world runs in `kiln launch` and in every rank's preflight: one line before training."""
    from pipeline.config import validate_world

    cfg = load_config("train", TINY_TRAIN, ["train.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="train.global_batch_tokens: 1,000 is not a multiple"):
        validate_world(cfg, 1)
