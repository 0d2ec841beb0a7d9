"""What training needs at real scale, checked at toy size: weights streamed tensor by tensor from per-rank
slices, start-up that does not read the corpus, validation that cannot vanish, per-rank dropout streams,
an O(1) sample order, and the lost-peer message under NCCL's wording."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, DataConfig, KilnError, ModelConfig, load_config
from pipeline.data.corpus import PreparedCorpus
from pipeline.data.sampler import Permutation, TrainData
from pipeline.model.gpt import Block
from pipeline.model.weights import DictWeights, ShardedWeights, save_weights, write_shard
from pipeline.parallel.parallelize import _tp_dropout_stream, checkpointed
from pipeline.train import _eval_batches, _lost_peer
from tests.factories import TRAIN_ENV, fake_corpus, kiln_train_cmd

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- weights, tensor by tensor


def test_streamed_safetensors_load_anywhere_and_hash_what_was_written(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "scalar": torch.tensor(2.0),
             "empty": torch.zeros(0, 4)}
    sha = save_weights(DictWeights(state), tmp_path / "w.safetensors", {"format": "pt"}, dtype=None)
    back = load_file(str(tmp_path / "w.safetensors"))  # the reference reader
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    import hashlib

    assert sha == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()


def _split(full: torch.Tensor, pad_to: int, tp: int, dp: int) -> list[list]:
    """Slices as TP ranks (rows, padded) and ZeRO-3 ranks (flat partitions of each TP slice) would write them."""
    padded = torch.cat([full, full.new_zeros(pad_to - full.size(0), *full.shape[1:])])
    files = []
    for r, rows in enumerate(padded.chunk(tp)):
        flat = rows.reshape(-1)
        size = -(-flat.numel() // dp)
        for d in range(dp):
            start, stop = d * size, min(flat.numel(), (d + 1) * size)
            files.append([("x", flat[start:stop].clone(), {"shape": list(full.shape),
                                                           "tp": [0, r * rows.size(0), (r + 1) * rows.size(0), pad_to],
                                                           "flat": [start, stop]})])
    return files


def test_sharded_weights_reassemble_tp_slices_and_zero3_partitions(tmp_path):
    full = torch.randn(97, 6)  # a vocabulary of 97 rows, padded to 128 for TP=2
    for i, slices in enumerate(_split(full, 128, tp=2, dp=3)):
        write_shard(tmp_path / f"rank_{i:05d}.safetensors", slices)
    got = ShardedWeights(tmp_path)
    assert got.names() == ["x"] and got.shape("x") == (97, 6)
    assert torch.equal(got.get("x"), full)


def test_a_missing_slice_is_named(tmp_path):
    files = _split(torch.randn(10, 4), 10, tp=2, dp=2)
    for i, slices in enumerate(files):
        if i != 3:  # the second TP slice's second partition is lost
            write_shard(tmp_path / f"rank_{i:05d}.safetensors", slices)
    with pytest.raises(KilnError, match="x: elements 10..20 are in no shard"):
        ShardedWeights(tmp_path).get("x")


# --------------------------------------------------------------------------- start-up reads no corpus


def _read_bytes() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.fault
def test_start_up_checks_shards_without_reading_them(tmp_path):
    from data_prep.indexed import FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS

    corpus = fake_corpus(tmp_path / "c", vocab_size=1000, train_docs=100_000, val_docs=100, shards=1)
    size = sum(f.stat().st_size for f in (corpus / "shards").iterdir())
    sampled = 2 * 2 * FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK  # 2 shards (train, val) x (.bin, .idx)
    assert size > 20 * sampled
    before = _read_bytes()
    TrainData(DataConfig(paths=[str(corpus)]), block_size=64, seed=0)
    assert _read_bytes() - before < sampled + 100_000  # the sampled blocks and the manifest, not the shards


@pytest.mark.fault
def test_fast_check_refuses_truncated_and_changed_shards_full_check_sees_every_byte(tmp_path):
    from data_prep.indexed import FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS

    corpus = fake_corpus(tmp_path / "c", vocab_size=1000, train_docs=3000, shards=1)
    bin_path = corpus / "shards" / "train_00000.bin"
    data = bytearray(bin_path.read_bytes())
    last = len(data) - FINGERPRINT_BLOCK
    between = last * 5 // (FINGERPRINT_BLOCKS - 1) + 2 * FINGERPRINT_BLOCK
    assert between < last * 6 // (FINGERPRINT_BLOCKS - 1)
    data[between] ^= 0xFF  # one byte between the fingerprint's sampled blocks
    bin_path.write_bytes(bytes(data))
    PreparedCorpus(corpus)  # start-up's check is cheap and cannot see it ...
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(corpus)],
                         capture_output=True, text=True, env=TRAIN_ENV, cwd=ROOT, timeout=120)
    assert res.returncode == 1 and "train_00000.bin: digest" in res.stderr  # ... `kiln verify` does
    data[0] ^= 0xFF  # the first block is sampled
    bin_path.write_bytes(bytes(data))
    with pytest.raises(KilnError, match="train_00000.bin/.idx: fingerprint .* does not match the manifest"):
        PreparedCorpus(corpus)
    bin_path.write_bytes(bytes(data[:-2]))
    with pytest.raises(KilnError, match="train_00000.bin: size .* does not match its index"):
        PreparedCorpus(corpus)


def test_sample_order_is_a_permutation_without_materializing_it():
    for n in (1, 2, 3, 97, 4096, 10_007):
        p = Permutation(n, [3, 1, 4])
        assert sorted(p(i) for i in range(n)) == list(range(n))
    big = Permutation(10**13, [1])  # a 20 TB corpus' windows: no array, any sample at once
    assert len({big(i) for i in range(1000)}) == 1000 and all(0 <= big(i) < 10**13 for i in (0, 10**13 - 1))
    assert [Permutation(1000, [1])(i) for i in range(5)] != [Permutation(1000, [2])(i) for i in range(5)]


# --------------------------------------------------------------------------- validation cannot vanish


def _kiln_train(tmp_path, *sets: str) -> subprocess.CompletedProcess:
    """`kiln train` on a fake corpus into tmp_path/run, as a user runs it, with an empty extensions cache."""
    corpus = fake_corpus(tmp_path / "c")
    env = {**TRAIN_ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    return subprocess.run(kiln_train_cmd(tmp_path / "run", f"data.paths=[{corpus}]", *sets), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _stub(val_windows: int, requested: int | None = None):
    return SimpleNamespace(val=[None] * val_windows, val_available=val_windows,
                           val_requested=requested or val_windows)


def test_a_validation_set_smaller_than_one_eval_batch_is_a_config_error():
    cfg = load_config("train", ROOT / "configs/train/125m-1node.yaml", ["data.val_tokens=32768"])
    layout = SimpleNamespace(dp=8, rank=0)
    with pytest.raises(ConfigError, match=r"validation holds 32 windows .* needs micro_batch_size 16 x dp 8 = 128"):
        _eval_batches(cfg, layout, _stub(32))
    assert _eval_batches(cfg, layout, _stub(1024)) == 8


@pytest.mark.parametrize("config,world", [("125m-1node.yaml", 8), ("1.3b-2x8.yaml", 16)])
def test_shipped_configs_validate_on_a_million_tokens(config, world):
    cfg = load_config("train", ROOT / "configs/train" / config, [])
    t, p = cfg.train, cfg.parallel
    layout = SimpleNamespace(dp=world // (p.tp * p.pp), rank=0)
    windows = cfg.data.val_tokens // cfg.model.block_size
    batches = _eval_batches(cfg, layout, _stub(windows))
    assert t.eval_every > 0 and batches * t.micro_batch_size * layout.dp * cfg.model.block_size >= 1_000_000


@pytest.mark.fault
def test_train_refuses_a_vanishing_validation_in_one_line(tmp_path):
    res = _kiln_train(tmp_path, "train.eval_every=5", "data.val_tokens=64")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "data.val_tokens: validation holds 1 windows" in errors[0]


# --------------------------------------------------------------------------- dropout streams


def test_dropout_seeds_differ_across_data_parallel_ranks_not_tensor_parallel():
    from pipeline.parallel.topology import Layout

    def seed(dp_rank, pp_rank, tp_rank):
        return Layout(tp=2, pp=2, dp=2, rank=0, world=8, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
                      grid=None, topology=None).dropout_seed(1234)

    assert seed(0, 0, 0) == seed(0, 0, 1) == 1234
    assert len({seed(d, p, 0) for d in (0, 1) for p in (0, 1)}) == 4


def test_tp_attention_dropout_stream_differs_per_rank_and_replays_under_checkpointing():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, dropout=0.5)
    x = torch.randn(2, 8, 16)

    def grads(tp_rank: int, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        block = Block(cfg)
        _tp_dropout_stream(block.attn, tp_rank)
        if checkpointing:
            checkpointed(block)
        torch.manual_seed(1)
        out = block(x.clone().requires_grad_())
        out.sum().backward()
        return out.detach(), [p.grad for p in block.parameters()]

    out0, g0 = grads(0, checkpointing=False)
    out0c, g0c = grads(0, checkpointing=True)
    out1, _ = grads(1, checkpointing=False)
    assert torch.equal(out0, out0c) and all(torch.equal(a, b) for a, b in zip(g0, g0c, strict=True))
    assert not torch.equal(out0, out1)  # another TP rank's heads draw other masks


# --------------------------------------------------------------------------- lost peer under NCCL


@pytest.mark.fault
@pytest.mark.parametrize("text", [
    "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE) ran for 1800042 ms",
    "NCCL communicator was aborted on rank 5.",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40321",
])
def test_nccl_and_gloo_peer_failures_are_recognized(text):
    assert _lost_peer(RuntimeError(text)) is not None
    assert _lost_peer(RuntimeError("CUDA out of memory")) is None


@pytest.mark.parametrize("preset", [None, "3"])
def test_nccl_error_handling_raises_instead_of_aborting(monkeypatch, preset):
    """On the NCCL path the group is created with async error handling 2 (abort the communicator, let the loop
    raise its one line) unless the user set another mode; seen by the process-group call itself (CPU: faked)."""
    import torch.distributed as dist

    from pipeline.parallel import topology

    class Created(Exception):
        pass

    seen = {}

    def init_process_group(backend, **kw):
        seen.update(backend=backend, mode=topology.os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
        raise Created

    # every variable init_distributed may set is recorded first (setenv), so the test leaves the environment as
    # it found it: a RANK left behind makes later in-process runs look launched
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING", "DS_ACCELERATOR"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    if preset:
        monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", preset)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    with pytest.raises(Created):
        topology.init_distributed()
    assert seen == {"backend": "nccl", "mode": preset or "2"}


@pytest.mark.slow
def test_checkpoint_files_are_hashed_by_their_writers(tmp_path):
    """SHA256SUMS lists every file of a checkpoint, weight slices included, and each digest is right."""
    res = _kiln_train(tmp_path, "train.steps=2", "checkpoint.every=2")
    assert res.returncode == 0, res.stderr[-2000:]
    step = tmp_path / "run/checkpoints/step_0000002"
    listed = dict(reversed(line.split("  ", 1)) for line in (step / "SHA256SUMS").read_text().splitlines())
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk and "weights/rank_00000.safetensors" in listed
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=step, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert json.loads((step / "kiln_state.json").read_text())["step"] == 2
    assert np.isfinite(json.loads(res.stdout.strip().splitlines()[-1])["loss"])
    # DeepSpeed's CPU shared-memory op (inference all-reduce only) is never JIT-compiled for training
    assert not (tmp_path / "torch_extensions").exists()


_MASTER_PROBE = """
import torch
from deepspeed.utils import safe_get_full_fp32_param
from pipeline.config import load_config
from pipeline.parallel.engine import Engine
from pipeline.parallel.topology import init_distributed, make_layout

cfg = load_config("train", TINY, ["parallel.zero_stage=1", "train.precision=fp32", "train.weight_decay=0.1",
                                    "model.vocab_size=256"])
init_distributed()
engine = Engine(cfg, make_layout(cfg))
opt = engine.engine.optimizer
assert engine.optimizer.defaults["fused"], "AdamW is not fused"
for own, master in zip(opt.bit16_groups_flat, opt.single_partition_of_fp32_groups, strict=True):
    assert master.data_ptr() == own.data_ptr(), "the fp32 master is a copy of the fp32 weights"
params = dict(engine.engine.module.named_parameters())
before = {n: p.detach().clone() for n, p in params.items()}
x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.block_size))
engine.train_step([(x, x)] * engine.accum)
for n, p in params.items():
    assert not torch.equal(p, before[n]), f"{n} did not move"
    assert torch.equal(safe_get_full_fp32_param(p), p), f"{n}: DeepSpeed's fragment map points at a stale copy"
print("ok")
"""


@pytest.mark.slow
def test_fp32_zero1_keeps_no_second_copy_of_the_weights():
    """At fp32 the optimizer's master partition is the weights' own storage (4 bytes a parameter saved), the
    step still moves every weight, and DeepSpeed's own fragment view reads the live value."""
    from tests.factories import ROOT, TINY_TRAIN

    script = f"TINY = {str(TINY_TRAIN)!r}\n" + _MASTER_PROBE
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=TRAIN_ENV, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
