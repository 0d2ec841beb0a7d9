"""Issue 15: eval, generate, distillation's teacher and prune run in bf16 autocast (+TF32) on a GPU, in fp32 on the
CPU. CUDA's presence is faked; the autocast the code enters is recorded (and run for real as CPU bf16 autocast)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import pipeline.device as device_mod
from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT


@pytest.fixture
def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)).eval()


def test_gpu_means_bf16_autocast_and_tf32_cpu_means_plain_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_mod.default_device() == "cpu" and device_mod.compute_dtype("cpu") == torch.float32
    assert isinstance(device_mod.autocast("cpu"), contextlib.nullcontext)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        assert device_mod.default_device() == "cuda" and device_mod.compute_dtype("cuda:0") == torch.bfloat16
        ctx = device_mod.autocast("cuda")  # built, not entered: there is no CUDA here
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # V100: fp32 (+ its TF32 flags)
    assert device_mod.compute_dtype("cuda") == torch.float32


class Recorder:
    """Stands in for pipeline.device.autocast: CPU bf16 autocast, recording the devices it was asked for."""

    def __init__(self):
        self.devices: list[str] = []

    def __call__(self, device):
        self.devices.append(torch.device(device).type)
        return torch.autocast("cpu", dtype=torch.bfloat16)


def _forwards_in_autocast(model: torch.nn.Module) -> list[bool]:
    seen: list[bool] = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def test_eval_and_generate_forward_inside_the_device_autocast(monkeypatch, tiny):
    import pipeline.evaluate as ev
    import pipeline.generate as gen

    rec = Recorder()
    monkeypatch.setattr(ev, "autocast", rec)
    monkeypatch.setattr(gen, "autocast", rec)
    seen = _forwards_in_autocast(tiny)
    tokens = np.random.default_rng(0).integers(0, 64, 80).astype(np.int64)
    stream = type("Stream", (), {"read": lambda self, b, n: tokens[b:b + n], "__len__": lambda self: len(tokens)})()
    res = ev.score_stream(tiny, stream, 16, batch_size=4, show=False)
    assert res["tokens"] == 79 and np.isfinite(res["nll"])
    assert seen and all(seen)
    seen.clear()
    out = list(gen.generate_ids(tiny, [1, 2, 3], 5, temperature=0, use_cache=False))
    assert len(out) == 5 and seen and all(seen)
    cached = list(gen.generate_ids(tiny, [1, 2, 3], 5, temperature=0, use_cache=True))  # the KV cache under bf16
    assert len(cached) == 5
    assert set(rec.devices) == {"cpu"}


def test_distillation_teacher_runs_in_the_device_autocast(monkeypatch, tiny):
    import pipeline.post.distill as distill

    rec = Recorder()
    monkeypatch.setattr(distill, "autocast", rec)
    seen = _forwards_in_autocast(tiny)
    x = torch.randint(0, 64, (2, 16))
    logits = distill.teacher_logits(tiny, x)
    assert seen == [True] and logits.dtype == torch.bfloat16 and not logits.requires_grad
    monkeypatch.setattr(distill, "autocast", device_mod.autocast)  # the real one, on the CPU: fp32, as before
    assert distill.teacher_logits(tiny, x).dtype == torch.float32


def test_prune_loads_onto_the_gpu_when_there_is_one(monkeypatch):
    import pipeline.post.prune as prune
    from pipeline.config import PruneConfig

    asked = []

    def load_parent(ref, device="cpu"):
        asked.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(prune, "load_parent", load_parent)
    for cuda in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        with pytest.raises(RuntimeError, match="stop here"):
            prune.prune("parent", PruneConfig(), "out")
    assert asked == ["cuda", "cpu"]


def test_cpu_threads_come_from_the_cores_this_process_may_use(monkeypatch):
    """Not the machine's core count: the affinity mask (a cgroup or taskset share), split over the node's
    processes; OMP_NUM_THREADS, when the user set it, wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_mod.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(device_mod.os, "sched_getaffinity", lambda pid: {3, 4, 5, 6, 7, 8}, raising=False)
    assert device_mod.cpu_threads() == 6 and device_mod.cpu_threads(processes=4) == 1
    assert device_mod.cpu_threads(processes=100) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert device_mod.cpu_threads() == 2 and device_mod.cpu_threads(processes=4) == 2
    old = torch.get_num_threads()
    try:
        assert device_mod.use_cpu_threads() == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
