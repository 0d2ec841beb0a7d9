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
        assert r["bf16_grads_held"] == 0, r  # each added to the fp32 sum and freed in backward (4 bytes, not 6)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """The 2-rank probes in one process group: PP=2 in bf16, bf16 at one micro-batch a step, ZeRO-3's init."""
    return probe("pipe", "+", "partition", "+", "zero3init", "+", "scatter", ranks=2)


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


@pytest.mark.slow
def test_zero3_drawn_from_the_seed_broadcasts_nothing_and_each_rank_holds_its_part(two_ranks):
    """Issue 26 item 3: under ZeRO-3 each data-parallel rank draws only the rows of its own partition (DP rank 0
    used to draw every parameter and broadcast it: the model's bytes), and holds exactly that part of the
    1-process model's value."""
    rows = [r for r in two_ranks if "zero3_rank" in r]
    assert sorted(r["zero3_rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["broadcast_bytes"] == 0 and r["param_bytes"] > 0 and r["slices"] > 0, r
        assert r["exact"] is True, r


@pytest.mark.slow
def test_bf16_fp32_sums_are_reduce_scattered_into_each_ranks_partition(two_ranks):
    """Issue 26 item 6: where bf16 gradients are summed in a whole fp32 buffer (ZeRO-1 with 2 micro-batches a
    step; PP=2; TP=2), each rank receives only its partition of the sum (reduce-scatter: half of what
    DeepSpeed's all-reduce moved; at DP=1 nothing), and trains as DeepSpeed's own path does: the same losses,
    grad norms (clipping active; each parameter counted once over TP and pipeline stages) and weights, to
    fp32 summation order (bf16 weights may round one unit apart) over 3 steps; saved after step 2 and resumed
    in a fresh engine, step 3 is the same to the bit."""
    rows = {(r["scatter_layout"], r["rank"]): r for r in two_ranks if "scatter_layout" in r}
    assert sorted(rows) == [(f"parallel.{k}", r) for k in ("pp=1", "pp=2", "tp=2") for r in (0, 1)]
    for (layout, _), r in rows.items():
        assert r["kiln_scatters"] and not r["deepspeed_scatters"], r
        (kiln, ds), (kiln_norm, ds_norm) = r["losses"], r["norms"]
        assert kiln == pytest.approx(ds, rel=1e-6) and kiln_norm == pytest.approx(ds_norm, rel=5e-5), r
        assert kiln_norm[0] == pytest.approx(ds_norm[0], rel=2e-6), r  # step 1: the same weights, so closer
        assert max(kiln_norm) > 0.1  # above train.grad_clip=0.05: clipped
        assert r["weights_max_diff"] <= 5e-4, r
        assert r["resumed_loss"][0] == r["resumed_loss"][1] and r["resumed_weights_equal"], r  # saved at step 2
        grads, ours, theirs = r["fp32_grad_bytes"], r["kiln_bytes"], r["deepspeed_bytes"]
        assert theirs["all_reduce"] >= 3 * grads and theirs["reduce_scatter_in"] == 0, r  # the whole buffer a step
        if layout == "parallel.pp=1":  # DP=2: the whole buffer in, this rank's half out; all-reduces: scalars
            assert 3 * grads <= ours["reduce_scatter_in"] <= 3 * grads + 4096, r
            assert ours["reduce_scatter_out"] * 2 == ours["reduce_scatter_in"] and ours["all_reduce"] < grads / 100, r
        elif layout == "parallel.pp=2":  # DP=1: no gradient reduction; left: the tied embedding's sum over stages
            assert ours["reduce_scatter_in"] == 0 and ours["all_reduce"] < grads / 2, r
        else:  # DP=1 (TP's own all-reduces of activations are the same in both)
            assert ours["reduce_scatter_in"] == 0 and ours["all_reduce"] < theirs["all_reduce"] - 2 * grads, r


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
