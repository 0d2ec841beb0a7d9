"""`kiln plan`: Chinchilla sizing against the paper, parameter counts, memory accounting."""

import json

import pytest

from pipeline.config import ConfigError, ModelConfig, load_config, validate_world
from pipeline.model.flops import flops_per_token, param_counts
from pipeline.plan import (
    GPU_PEAK_FLOPS,
    MEMORY_BUDGET,
    budget_flops,
    compute_optimal,
    gpu_peak_flops,
    make_plan,
    memory_per_gpu,
    nearest_model,
    recommend_layout,
    shipped_models,
)
from tests.factories import ROOT


def test_chinchilla_paper_point():
    # Hoffmann et al. 2022: Chinchilla, 70B params on 1.4T tokens, ~5.76e23 FLOPs.
    opt = compute_optimal(5.76e23)
    assert opt["params"] == pytest.approx(70e9, rel=0.03)
    assert opt["tokens"] == pytest.approx(1.4e12, rel=0.03)
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(5.76e23)


def test_gopher_budget_gives_smaller_model_than_gopher():
    # Same budget as Gopher (280B params, 300B tokens): Chinchilla says ~4x fewer params.
    opt = compute_optimal(6 * 280e9 * 300e9)
    assert 50e9 < opt["params"] < 80e9


def test_one_gpu_peak_table_for_plan_and_training_mfu():
    """`kiln plan --gpu` and training's MFU (torch.cuda.get_device_name()) read the same table."""
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == GPU_PEAK_FLOPS["h100"] == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB") == GPU_PEAK_FLOPS["a100"]
    assert gpu_peak_flops("NVIDIA A10G") == GPU_PEAK_FLOPS["a10g"]
    assert gpu_peak_flops("NVIDIA H200") == GPU_PEAK_FLOPS["h200"]
    assert gpu_peak_flops("Some Future Accelerator") is None
    assert budget_flops(1, 1 / 3600, "a10g", mfu=1.0) == gpu_peak_flops("NVIDIA A10G")


def test_budget_from_gpus_hours():
    assert budget_flops(64, 720, "h100", 0.4) == pytest.approx(64 * 720 * 3600 * 989e12 * 0.4)
    with pytest.raises(ConfigError, match="unknown GPU"):
        budget_flops(8, 1, "tpu9")
    with pytest.raises(ConfigError, match=r"unknown GPU; known: [a-z0-9, ]+$"):  # said as such, not searched for
        make_plan(flops=1e20, gpu="tpu9")


def test_shipped_sizes_match_their_names():
    for name, expected in [("125m", 125e6), ("350m", 350e6), ("760m", 760e6), ("1.3b", 1.3e9), ("2.7b", 2.7e9), ("6.7b", 6.7e9)]:
        picked, cfg, n = nearest_model(expected)
        assert picked == name
        assert n == pytest.approx(expected, rel=0.1)


def test_param_counts_gpt2_124m():
    # GPT-2 small: 124,439,808 params with vocab 50257, context 1024, tied head.
    cfg = ModelConfig(style="gpt2", n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    assert param_counts(cfg)["total"] == 124_439_808
    # 6N + 12*L*d*T with N = non-embedding + output matmul
    n = param_counts(cfg)["non_embedding"] + 50257 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024


def test_memory_zero_stages_shrink_per_gpu_state():
    cfg = ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50304)
    psi = param_counts(cfg)["total"]
    m0 = memory_per_gpu(cfg, dp=8, zero_stage=0)
    m1 = memory_per_gpu(cfg, dp=8, zero_stage=1)
    m2 = memory_per_gpu(cfg, dp=8, zero_stage=2)
    m3 = memory_per_gpu(cfg, dp=8, zero_stage=3)
    # bf16 weights (2) + the gradients' fp32 sum (4; each bf16 gradient freed once added: issue 26) + fp32
    # master weights and Adam moments (12): Megatron's distributed optimizer's 6 + 12/dp at stage 1
    assert m0["weights"] + m0["grads"] + m0["optimizer"] == pytest.approx(18 * psi)
    assert m1["optimizer"] == pytest.approx(12 * psi / 8)
    assert m2["grads"] == pytest.approx(4 * psi / 8)
    assert m3["weights"] == pytest.approx(2 * psi / 8)
    assert m0["total"] > m1["total"] > m2["total"] > m3["total"]
    # one micro-batch a step, no pipeline: no fp32 sum (engine.ds_config keeps the gradients bf16), 2 bytes a
    # parameter, 1/dp of them at stage 2; a pipeline still sums its micro-batches
    assert memory_per_gpu(cfg, dp=8, zero_stage=1, grad_accum=1)["grads"] == pytest.approx(2 * psi)
    assert memory_per_gpu(cfg, dp=8, zero_stage=2, grad_accum=1)["grads"] == pytest.approx(2 * psi / 8)
    assert memory_per_gpu(cfg, pp=2, dp=8, zero_stage=1, grad_accum=1)["grads"] == pytest.approx(4 * psi / 2)
    ckpt = memory_per_gpu(cfg, activation_checkpointing="full", micro_batch_size=4)
    full = memory_per_gpu(cfg, activation_checkpointing="none", micro_batch_size=4)
    assert ckpt["activations"] < full["activations"] / 5
    tp2 = memory_per_gpu(cfg, tp=2, micro_batch_size=4)
    assert tp2["weights"] == pytest.approx(full["weights"] / 2)
    # the config's levels: selective is bounded by none (counted alike), "full" is true
    assert memory_per_gpu(cfg, activation_checkpointing="selective", micro_batch_size=4) == full
    # Korthikanti et al.: s·b·h·(10 + 24/tp) bytes a layer under TP, 34·s·b·h/tp with sequence parallelism
    sbh = cfg.block_size * 4 * cfg.n_embd
    assert full["activations"] == pytest.approx(34 * sbh * cfg.n_layer)
    tp4 = memory_per_gpu(cfg, tp=4, micro_batch_size=4)
    assert tp4["activations"] == pytest.approx((10 + 24 / 4) * sbh * cfg.n_layer)
    # sequence parallelism: 34/tp, except the two gathered sub-block inputs (2·s·b·h each) autograd keeps whole
    sp4 = memory_per_gpu(cfg, tp=4, micro_batch_size=4, sequence_parallel=True)
    assert sp4["activations"] == pytest.approx((34 / 4 + 4 * 3 / 4) * sbh * cfg.n_layer)
    with pytest.raises(ConfigError, match="needs tensor parallelism"):
        memory_per_gpu(cfg, sequence_parallel=True)
    # the chunked loss holds one chunk of fp32 logits and their gradient; pipeline parallelism's loss all of them
    s, v = cfg.block_size, cfg.vocab_size
    assert full["logits"] == pytest.approx(8.0 * min(4096, 4 * s) * v)
    assert memory_per_gpu(cfg, micro_batch_size=4, loss_chunk=0)["logits"] == pytest.approx(8.0 * 4 * s * v)
    assert memory_per_gpu(cfg, micro_batch_size=4, pp=2)["logits"] == pytest.approx(8.0 * 4 * s * v)


def test_make_plan_for_a_cluster():
    plan = make_plan(gpus=64, hours=720, gpu="h100", layout={"tp": 2})
    assert plan["layout"]["dp"] == 32
    assert 1e10 < plan["optimal_params"] < 5e10
    assert plan["optimal_tokens"] == pytest.approx(20 * plan["optimal_params"])
    assert plan["model_config"] == "13b"  # nearest in log space to ~23B
    with pytest.raises(ConfigError, match="--flops, or --gpus and --hours"):
        make_plan(gpus=8)


def test_a_budget_whose_model_fits_no_single_gpu_is_answered_with_the_gpus_it_needs(capsys):
    """--flops alone asks for the compute-optimal size; a 70B-class answer does not fit the one default GPU, and
    the planner says how many it takes (a row, not an exit), with a layout that fits there."""
    from pipeline.cli import main

    assert main(["plan", "--flops", "5.76e23", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 6e10 < plan["optimal_params"] < 8e10 and plan["model_config"] == "70b"
    fits = plan["fits"]
    assert fits["gpus_given"] == 1 and fits["gpus_needed"] >= 8 and fits["gpu"] == "h100"
    layout = plan["layout"]
    assert layout["tp"] * layout["pp"] * layout["dp"] == fits["gpus_needed"]
    assert plan["memory_gib"]["total"] <= MEMORY_BUDGET * 80
    with pytest.raises(ConfigError):  # the smallest count: half of it fits no layout
        recommend_layout(shipped_models()["70b"], fits["gpus_needed"] // 2)



@pytest.mark.parametrize("config,gpus", [("125m-1node", 8), ("1.3b-2x8", 16), ("6.7b-4x8", 32)])
def test_kiln_plan_recommends_the_layout_the_shipped_config_uses(config, gpus, capsys):
    """The shipped GPU configs are what `kiln plan` recommends for their model and GPU count (H100, 80 GB)."""
    from pipeline.cli import main

    cfg = load_config("train", ROOT / "configs/train" / f"{config}.yaml", [])
    shipped = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": validate_world(cfg, gpus),
               "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision,
               "micro_batch_size": cfg.train.micro_batch_size,
               "activation_checkpointing": cfg.train.activation_checkpointing,
               "sequence_parallel": cfg.parallel.sequence_parallel}
    name = config.split("-")[0]
    assert recommend_layout(shipped_models()[name], gpus, "h100") == shipped
    assert main(["plan", "--gpus", str(gpus), "--hours", "100", "--model", name, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout_recommended"] and plan["layout"] == shipped
    # the 1.3b: pure data parallel without recomputation, micro-batch 8, also on a single GPU
    if name == "1.3b":
        assert recommend_layout(shipped_models()[name], 1)["micro_batch_size"] == 8


def test_a_layout_given_on_the_command_line_is_checked_not_replaced(capsys):
    from pipeline.cli import main

    assert main(["plan", "--gpus", "16", "--hours", "100", "--model", "1.3b", "--tp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["layout_recommended"] and plan["layout"]["tp"] == 2 and plan["layout"]["dp"] == 8


def test_tensor_parallel_from_four_comes_with_sequence_parallelism(capsys):
    """A 13B-class model on 2 nodes needs TP=4; at that size the activations TP leaves whole on every rank
    (norms, residuals: 10·s·b·h a layer) are worth splitting, so the recommendation turns sequence parallelism on,
    and `--sequence-parallel` checks a given layout with it."""
    from pipeline.cli import main

    cfg = ModelConfig(n_layer=40, n_head=40, n_embd=5120, block_size=2048, vocab_size=50304)
    layout = recommend_layout(cfg, 16)
    assert layout["tp"] == 4 and layout["sequence_parallel"] and layout["activation_checkpointing"] == "none"
    # on 8 GPUs ZeRO-1 shards the optimizer only 2 ways at tp=4, which still fits with the gradients' fp32 sum
    # alone (4 bytes, issue 26); on 4 GPUs (one way) only with recomputation
    assert recommend_layout(cfg, 8)["tp"] == 4 and recommend_layout(cfg, 8)["activation_checkpointing"] == "none"
    assert recommend_layout(cfg, 4)["activation_checkpointing"] == "full"
    plain = {**layout, "sequence_parallel": False}
    assert memory_per_gpu(cfg, **layout)["activations"] < memory_per_gpu(cfg, **plain)["activations"] * 0.75
    assert recommend_layout(cfg.model_copy(update={"n_layer": 8}), 8)["sequence_parallel"] is False  # tp 1
    args = ["plan", "--gpus", "8", "--hours", "10", "--model", "1.3b", "--tp", "4", "--json"]
    assert main(args) == 0
    without = json.loads(capsys.readouterr().out)
    assert main([*args, "--sequence-parallel"]) == 0
    with_sp = json.loads(capsys.readouterr().out)
    assert with_sp["layout"]["sequence_parallel"] and not without["layout"].get("sequence_parallel")
    assert with_sp["memory_gib"]["activations"] < without["memory_gib"]["activations"]


def test_a_small_budget_prints_its_counts_not_zero_billions(capsys):
    from pipeline.cli import main

    assert main(["plan", "--flops", "1e14"]) == 0
    table = capsys.readouterr().err
    assert "912,871" in table and "18.3 M" in table and "0.00 B" not in table and "│ 0 B" not in table
    assert "configs/model/demo.yaml (11.4 M params)" in table  # the nearest: the CPU demo model, not 125m


def test_cpu_plan_with_the_users_vocabulary(tmp_path, monkeypatch, capsys):
    """`--gpu cpu`: this machine's measured fp32 matmul peak (said to be a CPU estimate) and the time the budget
    takes on it; `--data DIR`: the model gets the prep output's vocabulary, as kiln train gives it, so the demo
    model with a 4,096 vocabulary counts 2.56 M parameters, not the 11.4 M of the default 50,304."""
    import torch

    from data_prep.synthetic import fake_corpus
    from pipeline.cli import main

    data = fake_corpus(tmp_path / "prepped", vocab_size=4096, train_docs=8, val_docs=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    old = torch.get_num_threads()
    try:
        assert main(["plan", "--flops", "1e14", "--gpu", "cpu", "--model", "demo", "--data", str(data), "--json"]) == 0
    finally:
        torch.set_num_threads(old)
    printed = capsys.readouterr()
    plan = json.loads(printed.out.strip().splitlines()[-1])
    demo = load_config("train", ROOT / "configs/model/demo.yaml").model
    demo.vocab_size = 4096
    assert plan["model_params"] == param_counts(demo)["total"] == 2_557_632 and plan["vocab_size"] == 4096
    assert plan["peak_flops"] > 0 and plan["hours_on_one"] == pytest.approx(1e14 / (plan["peak_flops"] * 0.4) / 3600)
    assert plan["layout"]["precision"] == "fp32"
    table = " ".join(printed.err.replace("│", " ").split())  # the table's wrapped cells, read as one text
    assert plan["peak_from"] == "CPU estimate: fp32 matmul measured on this machine, 1 thread(s)"
    assert "GFLOP/s (CPU estimate:" in table and "2.6 M params" in table and "4,096 (" in table
    assert main(["plan", "--flops", "1e14", "--gpu", "tpu"]) == 2
    assert "known: a100, a10g, b200, h100, h200, l40s, v100, cpu" in capsys.readouterr().err
