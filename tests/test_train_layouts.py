"""Every layout trains the same model: 1 process vs TP=2, PP=2, DP=2 with ZeRO 1/2/3 (+ offload), TP=2 x PP=2
(also with sequence parallelism: stages pass each other 1/tp of the sequence), TP=2 x DP=2; and the
mixture-of-experts family at TP=2 and at EP=2 (ZeRO 0, 1, 2), resumed at EP=2, at 1 process and at DP=2; the
architecture options (q/k norms, ReLU² MLP, logit soft-cap, zero-initialized projections) at TP=2 x PP=2 with
sequence parallelism (the soft-capped tied head on the last stage, its chunked loss at 1 process).
The model uses grouped-query attention (4 query heads on 2 key/value heads: one per TP rank).

Real DeepSpeed engines on gloo (torchrun, CPU, fp32). To keep process start-up
cheap, one torchrun runs several configs in a row (this file is its worker when
run as a script). Also: a TP=2 x PP=2 checkpoint resumed at TP=1 (layout change)
continues with the same loss, and `train.init_from` starts from consolidated weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.corpus import PreparedCorpus
from pipeline.evaluate import count_bytes, evaluate_windows
from pipeline.model.io import load_model_dir, verify_sums
from pipeline.model.parallel_save import WRITERS
from pipeline.model.weights import INDEX, open_weights
from tests.factories import TRAIN_ENV, fake_corpus, launcher, small_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/train/tiny-cpu.yaml"
VOCAB = 100  # padded to 128 under TP=2: padding must not change the loss
COMMON = ["model.n_kv_heads=2", "train.steps=10", "checkpoint.every=5", "train.log_every=1", "train.eval_every=5", "train.eval_batches=2"]

# name -> (processes, overrides); global batch 8 everywhere (4 x grad_accum x dp)
LAYOUTS = {
    "ref": (1, ["train.grad_accum=2"]),
    "ref_untied": (1, ["train.grad_accum=2", "model.tie_embeddings=false"]),
    "tp2": (2, ["parallel.tp=2", "train.grad_accum=2", "train.activation_checkpointing=true"]),
    "pp2": (2, ["parallel.pp=2", "train.grad_accum=2", "parallel.partition=uniform"]),
    "pp2_untied": (2, ["parallel.pp=2", "train.grad_accum=2", "model.tie_embeddings=false",
                       "train.activation_checkpointing=true"]),
    "dp2_zero1": (2, ["parallel.zero_stage=1"]),
    "dp2_zero2": (2, ["parallel.zero_stage=2"]),
    "dp2_zero3": (2, ["parallel.zero_stage=3"]),
    "dp2_zero2_offload": (2, ["parallel.zero_stage=2", "parallel.offload=cpu"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "train.grad_accum=2"]),
    "tp2_pp2_sp": (4, ["parallel.tp=2", "parallel.pp=2", "train.grad_accum=2", "parallel.sequence_parallel=true"]),
    "tp2_dp2_zero1": (4, ["parallel.tp=2", "parallel.zero_stage=1"]),
    # the mixture-of-experts family: TP splits each expert; EP=2 puts 2 of the 4 experts on each DP rank
    "ref_moe": (1, ["train.grad_accum=2"]),
    "moe_tp2": (2, ["parallel.tp=2", "train.grad_accum=2", "train.activation_checkpointing=true"]),
    "moe_ep2_zero0": (2, ["parallel.ep=2", "train.activation_checkpointing=full"]),
    "moe_ep2_zero1": (2, ["parallel.ep=2", "parallel.zero_stage=1"]),
    "moe_ep2_zero2": (2, ["parallel.ep=2", "parallel.zero_stage=2"]),
    # Muon: Kiln's at stage 0 gathers TP slices to orthogonalize whole matrices; DeepSpeed's at stages 1/2
    # (no gradient clipping there: DeepSpeed would clip the orthogonalized update)
    "ref_muon": (1, ["train.grad_accum=2"]),
    "muon_tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "train.grad_accum=2"]),
    "muon_tp2": (2, ["parallel.tp=2", "train.grad_accum=2"]),
    "muon_dp2_zero1": (2, ["parallel.zero_stage=1"]),
    "muon_dp2_zero2": (2, ["parallel.zero_stage=2"]),
    # the architecture options of model: (OPTIONS below)
    "ref_options": (1, ["train.grad_accum=2"]),
    "tp2_pp2_sp_options": (4, ["parallel.tp=2", "parallel.pp=2", "train.grad_accum=2", "parallel.sequence_parallel=true"]),
}
OPTIONS = ["model.qk_norm=true", "model.mlp=relu2", "model.logit_softcap=2.0", "model.zero_init_proj=true"]
MOE = ["model.style=mixtral", "model.n_experts=4", "model.ffn_hidden=64"]  # (a shared expert: tests/test_tp.py)
MUON = ["train.optimizer=muon", "train.muon_lr=0.02", "train.grad_clip=0", "train.schedule=wsd",
        "train.muon_ns_precision=fp32"]  # bf16 rounding would swamp a layout's last-digit differences


ENV = {**TRAIN_ENV, "TORCHDYNAMO_DISABLE": "1"}  # DeepSpeed compiles its Muon kernels: minutes on a CPU test box


def run_many(nproc: int, specs: list[list[str]]) -> str:
    """Train several configs in one process group; returns what they logged (stderr)."""
    cmd = [*launcher(nproc), str(Path(__file__).resolve()), str(CONFIG), *[json.dumps(s) for s in specs]]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stderr


def run_cli(nproc: int, overrides: list[str]) -> dict:
    """The documented multi-process path: `torchrun --no-python kiln train --config F --set ...`."""
    kiln = shutil.which("kiln") or str(Path(sys.executable).parent / "kiln")
    cmd = [*launcher(nproc), "--no-python", kiln, "train", "--config", str(CONFIG), "--json",
           *[a for o in overrides for a in ("--set", o)]]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def copy_step5(src: Path, dst: Path) -> None:
    """A run directory as it was right after its step-5 checkpoint."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_0000005", dst / "checkpoints" / "step_0000005")
    (dst / "checkpoints" / "latest").write_text("step_0000005\n")
    shutil.copy(src / "metrics.jsonl", dst / "metrics.jsonl")


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's MODEL dir, verified: one file (1 process) or one shard per rank."""
    verify_sums(out / "model")
    return open_weights(out / "model").to_dict()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("layouts")
    corpus = fake_corpus(base / "corpus", vocab_size=VOCAB, tokenizer=small_tokenizer(base / "tok.model", VOCAB))

    def spec(name: str, *extra: str) -> list[str]:
        family = (MOE if "moe" in name else MUON if "muon" in name else OPTIONS if name.endswith("options")
                  else [])
        return [f"data.paths=[{corpus}]", f"out={base / name}", *COMMON, *family, *LAYOUTS[name][1], *extra]

    run_many(4, [spec("tp2_pp2"), spec("tp2_pp2_sp"), spec("tp2_dp2_zero1"), spec("muon_tp2_pp2"),
                 spec("tp2_pp2_sp_options")])
    # the documented CLI path, and a multi-rank resume: ZeRO-3 partitions restored from step 5
    summary = run_cli(2, spec("tp2"))
    assert summary["layout"] == "world 2 = dp 1 x pp 1 x tp 2" and summary["steps"] == 10
    zero3 = [n for n, (p, _) in LAYOUTS.items() if p == 2 and n != "tp2"]
    run_many(2, [spec(n) for n in zero3] + [{"copy": [str(base / "dp2_zero3"), str(base / "zero3_resumed")]},
                                             spec("dp2_zero3", f"out={base / 'zero3_resumed'}"),
                                             {"copy": [str(base / "moe_ep2_zero1"), str(base / "moe_resumed")]},
                                             spec("moe_ep2_zero1", f"out={base / 'moe_resumed'}"),
                                             {"copy": [str(base / "moe_ep2_zero1"), str(base / "moe_ep_off")]},
                                             spec("moe_ep2_zero1", f"out={base / 'moe_ep_off'}", "parallel.ep=1"),
                                             {"copy": [str(base / "muon_dp2_zero1"), str(base / "muon_zero1_resumed")]},
                                             spec("muon_dp2_zero1", f"out={base / 'muon_zero1_resumed'}"),
                                             # TP=2 x PP=2's step 5 at TP=2: each rank reads its TP slices only
                                             {"copy": [str(base / "tp2_pp2"), str(base / "tp2_pp2_at_tp2")]},
                                             spec("tp2", f"out={base / 'tp2_pp2_at_tp2'}")])
    # layout change: the TP=2 x PP=2 run's checkpoint at step 5, continued by 1 process
    moved = base / "moved"
    copy_step5(base / "tp2_pp2", moved)
    copy_step5(base / "moe_ep2_zero1", base / "moe_moved")  # experts written by the rank holding them
    copy_step5(base / "muon_tp2", base / "muon_tp2_resumed_tp1")  # Muon's momentum at another layout: fresh
    (base / "one_process.log").write_text(run_many(1, [
                 spec("ref"), spec("ref_untied"), spec("ref_moe"), spec("ref_muon"), spec("ref_moe", f"out={base / 'moe_moved'}"),
                 {"copy": [str(base / "ref_muon"), str(base / "muon_resumed")]}, spec("ref_muon", f"out={base / 'muon_resumed'}"),
                 spec("ref_muon", f"out={base / 'muon_tp2_resumed_tp1'}"), spec("ref_options"),
                 [f"data.paths=[{corpus}]", f"out={moved}", *COMMON, "train.grad_accum=2"],
                 [f"data.paths=[{corpus}]", f"out={base / 'init'}", *COMMON, "train.grad_accum=2", "train.steps=3",
                  f"train.init_from={base / 'ref' / 'model'}"]]))
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in LAYOUTS if not n.startswith("ref")])
def test_layout_matches_one_process(runs, name):
    ref_name = ("ref_untied" if name.endswith("untied") else "ref_moe" if name.startswith("moe")
                else "ref_muon" if name.startswith("muon") else "ref_options" if name.endswith("options") else "ref")
    ref, got = metrics(runs / ref_name), metrics(runs / name)
    assert [m["step"] for m in got] == list(range(1, 11))
    for r, g in zip(ref, got, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], abs=2e-5), (name, r["step"])
        if r.get("grad_norm") is not None and g.get("grad_norm") is not None:  # (Muon without clipping: none)
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3), (name, r["step"])
        assert g.get("val_loss", -1) == pytest.approx(r.get("val_loss", -1), abs=2e-5), (name, r["step"])
        assert g.get("val_bpb", -1) == pytest.approx(r.get("val_bpb", -1), abs=2e-5), (name, r["step"])
    assert all("val_loss" in got[s] and "val_bpb" in got[s] for s in (4, 9))
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.3  # it learns
    a, b = model_weights(runs / ref_name), model_weights(runs / name)
    assert a.keys() == b.keys()  # consolidated from TP shards / ZeRO partitions / stages
    index = json.loads((runs / name / "model" / INDEX).read_text())  # each rank wrote a shard of it
    assert sorted(index["metadata"][WRITERS].values()) == list(range(LAYOUTS[name][0])), index["metadata"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=f"{name} {k}")


@pytest.mark.slow
def test_val_bpb_is_kiln_evals_bits_per_byte_of_the_validation_windows(runs):
    """Training's val_bpb at the last step is what `kiln eval`'s code path gives the final model on the same 8
    windows (eval_batches 2 x micro-batch 4): the loss over the UTF-8 bytes of the targets, in bits."""
    last = metrics(runs / "ref")[-1]
    model, _ = load_model_dir(runs / "ref" / "model")
    block = model.cfg.block_size
    scored = evaluate_windows(model, runs / "corpus", 8)
    assert scored["tokens"] == 8 * block and scored["loss"] == pytest.approx(last["val_loss"], abs=2e-5)
    assert last["val_bpb"] == pytest.approx(scored["bits_per_byte"], rel=1e-5)
    n_bytes = count_bytes(PreparedCorpus(runs / "corpus").stream("val").read(1, 8 * block), runs / "tok.model")
    assert n_bytes == scored["bytes"] and last["val_bpb"] == pytest.approx(
        last["val_loss"] * 8 * block / math.log(2) / n_bytes, rel=1e-6)


@pytest.mark.slow
@pytest.mark.fault
def test_multi_rank_zero3_resume_continues_exactly(runs):
    full, resumed = metrics(runs / "dp2_zero3"), metrics(runs / "zero3_resumed")
    assert [m["step"] for m in resumed] == list(range(1, 11))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    a, b = model_weights(runs / "dp2_zero3"), model_weights(runs / "zero3_resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.parametrize("name", ["muon_resumed", "muon_zero1_resumed"])
def test_muon_resume_continues_exactly(runs, name):
    """Muon's momentum is restored with the checkpoint: Kiln's (stage 0) and DeepSpeed's (ZeRO-1)."""
    full = metrics(runs / ("ref_muon" if name == "muon_resumed" else "muon_dp2_zero1"))
    resumed = metrics(runs / name)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], abs=1e-6)


@pytest.mark.slow
@pytest.mark.fault
def test_muon_checkpoint_at_tp2_continues_at_one_process(runs):
    before, after = metrics(runs / "muon_tp2"), metrics(runs / "muon_tp2_resumed_tp1")
    assert after[5]["loss"] == pytest.approx(before[5]["loss"], abs=2e-5)  # the step-5 weights, exact
    assert all(abs(a["loss"] - b["loss"]) < 0.1 for a, b in zip(before[6:], after[6:], strict=True))  # fresh momentum


def continues_from_step_5(before_run: Path, after_run: Path) -> None:
    """`after_run` resumed `before_run`'s step-5 checkpoint at another layout: step 6's loss is computed with
    the step-5 weights, so the checkpoint is exact; later steps differ only by the optimizer state starting
    fresh, so the curve stays continuous."""
    before, after = metrics(before_run), metrics(after_run)
    assert [m["step"] for m in after] == list(range(1, 11))
    assert after[5]["loss"] == pytest.approx(before[5]["loss"], abs=2e-5)
    for b, a in zip(before[6:], after[6:], strict=True):
        assert abs(a["loss"] - b["loss"]) < 0.05


@pytest.mark.slow
@pytest.mark.fault
def test_checkpoint_from_tp2_pp2_continues_at_tp1(runs):
    continues_from_step_5(runs / "tp2_pp2", runs / "moved")
    state = json.loads((runs / "moved/checkpoints/step_0000010/kiln_state.json").read_text())
    assert state["layout"]["tp"] == 1 and state["consumed_samples"] == 80
    # and the user was told, once, for that checkpoint only
    warned = [ln for ln in (runs / "one_process.log").read_text().splitlines()
              if "was saved with layout" in ln and "moe_moved" not in ln and "muon_tp2" not in ln]
    assert len(warned) == 1, warned
    assert str(runs / "moved/checkpoints/step_0000005") in warned[0] and "optimizer state starts fresh" in warned[0]


@pytest.mark.slow
@pytest.mark.fault
def test_checkpoint_from_tp2_pp2_continues_at_tp2(runs):
    """Its ranks rebuild their slices from the rows they hold alone (Weights.rows), vocabulary padding too."""
    continues_from_step_5(runs / "tp2_pp2", runs / "tp2_pp2_at_tp2")


@pytest.mark.slow
@pytest.mark.fault
def test_expert_parallel_checkpoint_resumes_and_changes_layout(runs):
    """EP=2 from its step-5 checkpoint (DeepSpeed's per-expert files) continues exactly; at 1 process, and at 2
    processes without EP (Kiln's weight shards, each expert from its own rank), step 6 is exact and the curve
    continuous."""
    full, resumed = metrics(runs / "moe_ep2_zero1"), metrics(runs / "moe_resumed")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    for moved in (metrics(runs / "moe_moved"), metrics(runs / "moe_ep_off")):
        assert moved[5]["loss"] == pytest.approx(full[5]["loss"], abs=2e-5)
        for b, a in zip(full[6:], moved[6:], strict=True):
            assert abs(a["loss"] - b["loss"]) < 0.05
    state = json.loads((runs / "moe_ep_off/checkpoints/step_0000010/kiln_state.json").read_text())
    assert "ep" not in state["layout"] and state["layout"]["world"] == 2


@pytest.mark.slow
def test_init_from_model_dir_starts_where_it_ended(runs):
    ref, init = metrics(runs / "ref"), metrics(runs / "init")
    assert init[0]["loss"] < ref[0]["loss"] - 0.3
    assert abs(init[0]["loss"] - ref[-1]["loss"]) < 0.15
    assert math.isfinite(init[-1]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2_pp2", "moe_ep2_zero1"])
def test_export_checkpoint_of_any_layout(runs, tmp_path, name):
    """The transformers form (LlamaForCausalLM, MixtralForCausalLM) of a checkpoint gives the trained logits."""
    from pipeline.export import export
    from pipeline.hf.mapping import to_hf
    from pipeline.model.io import load_model_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = export(runs / name / "checkpoints" / "latest", tmp_path / "m", "safetensors")
    assert summary["source"].endswith("step_0000010")
    exported, _ = load_model_dir(tmp_path / "m")
    trained, _ = load_model_dir(runs / name / "model")
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(idx)[0], trained(idx)[0])
        hf = to_hf(dict(exported.state_dict()), exported.cfg)
        torch.testing.assert_close(hf(idx).logits, trained(idx)[0], rtol=0, atol=1e-4)


if __name__ == "__main__":  # worker: run several configs in this (torchrun) process group
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.train import train

    for item in map(json.loads, sys.argv[2:]):
        if isinstance(item, dict):  # {"copy": [run, new run]}: rank 0 copies, everyone waits
            if dist.get_rank() == 0:
                copy_step5(Path(item["copy"][0]), Path(item["copy"][1]))
            dist.barrier()
            continue
        train(load_config("train", sys.argv[1], item))
