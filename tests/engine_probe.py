"""Run by tests/test_engine_precision.py in a fresh process (DeepSpeed needs a process group; PP needs two ranks).
Prints one JSON line per probe.

    python tests/engine_probe.py accum STAGE...   # bf16 ZeRO stages: optimizer, grad dtype after 2 micro-batches
    python tests/engine_probe.py pipe             # (torchrun, 2 ranks) the same for PP=2 after one step
    python tests/engine_probe.py partition        # (torchrun, 2 ranks) bf16, 1 micro-batch: gradients held per rank
    python tests/engine_probe.py zero3init        # (torchrun, 2 ranks) ZeRO-3 built from the seed: bytes broadcast
    python tests/engine_probe.py scatter          # (torchrun, 2 ranks) bf16 fp32 sums, DP=2 and PP=2: Kiln's reduce-
                                                  #   scatter against DeepSpeed's all-reduce (losses, norms, bytes)
    python tests/engine_probe.py syncs OUT CORPUS # train 6 steps (log every 3): where Kiln reads device values
    python tests/engine_probe.py accum 1 2 3 + syncs OUT CORPUS   # several in one process (one start-up)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.parallel.engine import Engine  # noqa: E402
from pipeline.parallel.topology import init_distributed, make_layout  # noqa: E402

TINY = ROOT / "configs/train/tiny-cpu.yaml"
VOCAB = 64


def batch(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.model.block_size + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def print_all(row: dict) -> None:
    """Collective: every rank's `row`, printed by rank 0 as JSON lines in rank order."""
    import torch.distributed as dist

    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print("\n".join(json.dumps(r) for r in rows), flush=True)


def flat_weights(engine) -> torch.Tensor:
    """This rank's weights, all of them as one fp32 vector."""
    return torch.cat([p.detach().float().flatten() for p in engine.engine.module.parameters()])


def accum(stages: list[int]) -> None:
    from deepspeed.utils import safe_get_full_grad

    init_distributed()
    for stage in stages:
        cfg = load_config("train", TINY, [f"parallel.zero_stage={stage}", "train.precision=bf16", "train.grad_accum=4",
                                          f"model.vocab_size={VOCAB}"])
        engine = Engine(cfg, make_layout(cfg))
        ds = engine.engine
        for seed in range(2):  # 2 of 4 micro-batches: the sum lives in DeepSpeed's accumulation buffers
            x, y = batch(cfg, seed)
            ds.backward(ds(x, y)[1])
            ds.step()
        grads = [safe_get_full_grad(p) for p in ds.module.parameters()]
        print(json.dumps({"stage": stage, "optimizer": type(ds.optimizer).__name__,
                          "param_dtype": str(next(ds.module.parameters()).dtype),
                          "grad_dtypes": sorted({str(g.dtype) for g in grads if g is not None}),
                          "grads": sum(g is not None for g in grads), "params": len(grads),
                          "bf16_grads_held": sum(p.grad is not None for p in ds.module.parameters()),
                          "nonzero": all(bool(g.abs().sum() > 0) for g in grads if g is not None)}), flush=True)
        engine.close()


def pipe() -> None:
    import torch.distributed as dist

    init_distributed()
    cfg = load_config("train", TINY, ["parallel.pp=2", "parallel.zero_stage=1", "train.precision=bf16",
                                      "train.grad_accum=2", f"model.vocab_size={VOCAB}"])
    engine = Engine(cfg, make_layout(cfg))
    loss, _ = engine.train_step([batch(cfg, s) for s in range(2)])
    opt = engine.engine.optimizer
    flat = getattr(opt, "fp32_groups_gradients_flat", [])
    if dist.get_rank() == 0:
        print(json.dumps({"optimizer": type(opt).__name__, "grad_dtypes": sorted({str(g.dtype) for g in flat}),
                          "loss": float(loss)}), flush=True)
    engine.close()


def partition() -> None:
    """(2 ranks) bf16, one micro-batch a step, no pipeline, stages 1 and 2 after one backward: the optimizer, the
    dtype and size of the gradients each rank holds, and whether DeepSpeed's throughput timer is off."""
    import torch.distributed as dist

    init_distributed()
    for stage in (1, 2):
        cfg = load_config("train", TINY, [f"parallel.zero_stage={stage}", "train.precision=bf16", "train.grad_accum=1",
                                          f"model.vocab_size={VOCAB}"])
        engine = Engine(cfg, make_layout(cfg))
        ds = engine.engine
        x, y = batch(cfg, dist.get_rank())
        ds.backward(ds(x, y)[1])
        opt = ds.optimizer
        held = [g for grads in getattr(opt, "averaged_gradients", {}).values() for g in grads if g is not None]
        params = list(ds.module.parameters())
        row = ({"partition_stage": stage, "rank": dist.get_rank(), "optimizer": type(opt).__name__,
                          "params": sum(p.numel() for p in params),
                          "partition": sum(p.numel() for p in opt.single_partition_of_fp32_groups),
                          "grad_elements": sum(g.numel() for g in held) if held else
                          sum(p.grad.numel() for p in params if p.grad is not None),
                          "grad_dtypes": sorted({str(g.dtype) for g in held} | {str(p.grad.dtype) for p in params
                                                                                 if p.grad is not None}),
                          "fp32_accum_buffers": sum(hasattr(p, "grad_accum") and p.grad_accum is not None for p in params),
                          "throughput_timer": ds.tput_timer.config.enabled})
        print_all(row)
        ds.step()
        engine.close()


def zero3init() -> None:
    """(2 ranks) ZeRO-3 built from the seed: the bytes broadcast while the engine is built, against the model's,
    and whether each rank's partition of every parameter is that part of the 1-process model's value."""
    import torch.distributed as dist

    from pipeline.model.init import initial_slice
    from pipeline.parallel.materialize import local_slices, parts

    init_distributed()
    cfg = load_config("train", TINY, ["parallel.zero_stage=3", f"model.vocab_size={VOCAB}"])
    sent, real = [0], dist.broadcast

    def counting(tensor, *a, **k):
        sent[0] += tensor.numel() * tensor.element_size()
        return real(tensor, *a, **k)

    dist.broadcast = counting
    engine = Engine(cfg, make_layout(cfg))
    dist.broadcast = real
    module = engine.engine.module
    plans = {part.kiln_part[1] + n: (k, s, shape) for part in parts(module) for n, k, s, shape in part.kiln_part[2]}
    exact = all(torch.equal(t.float(), initial_slice(*plans[name][:2], plans[name][2], f"{cfg.train.seed}:{name}")
                            .flatten()[slice(*spec["flat"])]) for name, t, spec in local_slices(module, engine.layout, True))
    row = {"zero3_rank": dist.get_rank(), "broadcast_bytes": sent[0], "exact": exact,
           "param_bytes": sum(p.ds_numel * p.element_size() for p in module.parameters()),
           "slices": len(local_slices(module, engine.layout, True))}
    print_all(row)
    engine.close()


def _scatter_step(engine, cfg, step: int) -> list[float]:
    """One step of the scatter probe on this rank's 2 micro-batches of that step: [loss, grad norm]."""
    import torch.distributed as dist

    loss, norm = engine.train_step([batch(cfg, 100 * step + 10 * dist.get_rank() + m) for m in range(2)])
    return list(engine.read(loss, norm))


def scatter() -> None:
    """(2 ranks) bf16 with fp32 gradient sums (2 micro-batches a step, clipping active), at DP=2 ZeRO-1 and at
    PP=2: 3 steps with Kiln's reduce-scatter (grad_scatter.py) and 3 with DeepSpeed's own all-reduce, from the
    same weights and batches: per-step losses and grad norms, the final weights, and the bytes each rank
    handed to all_reduce / reduce_scatter during the steps."""
    import torch.distributed as dist

    from pipeline.parallel import grad_scatter

    init_distributed()
    sent = {"all_reduce": 0, "reduce_scatter_in": 0, "reduce_scatter_out": 0}
    real = {"all_reduce": dist.all_reduce, "reduce_scatter": dist.reduce_scatter_single}

    def all_reduce(tensor, *a, **k):
        sent["all_reduce"] += tensor.numel() * tensor.element_size()
        return real["all_reduce"](tensor, *a, **k)

    def reduce_scatter(output, input, *a, **k):
        sent["reduce_scatter_in"] += input.numel() * input.element_size()
        sent["reduce_scatter_out"] += output.numel() * output.element_size()
        return real["reduce_scatter"](output, input, *a, **k)

    import pipeline.parallel.engine as engine_mod

    install, config = grad_scatter.install, engine_mod.ds_config
    work = [tempfile.mkdtemp(prefix="kiln-probe-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(work)
    work = Path(work[0])

    def deepspeeds_own(*a, **k):  # DeepSpeed's defaults: every bf16 gradient kept until the step
        out = config(*a, **k)
        out["bf16"]["immediate_grad_update"] = False
        return out
    for layout in ("parallel.pp=1", "parallel.pp=2", "parallel.tp=2"):
        cfg = load_config("train", TINY, [layout, "parallel.zero_stage=1", "train.precision=bf16", "train.grad_accum=2",
                                          "train.grad_clip=0.05",
                                          f"model.vocab_size={VOCAB}"])
        runs, ckpt = {}, work / layout
        for way in ("kiln", "deepspeed"):
            grad_scatter.install = install if way == "kiln" else (lambda engine: False)
            engine_mod.ds_config = config if way == "kiln" else deepspeeds_own
            engine = Engine(cfg, make_layout(cfg))
            scattering = getattr(engine.engine, "kiln_reduce_scatter", False)
            dist.all_reduce, dist.reduce_scatter_single = all_reduce, reduce_scatter
            for k in sent:
                sent[k] = 0
            losses, norms = [], []
            for step in range(3):
                if way == "kiln" and step == 2:  # Kiln's way is saved here, and resumed below
                    engine.save(ckpt)
                loss, norm = _scatter_step(engine, cfg, step)
                losses.append(loss)
                norms.append(norm)
            dist.all_reduce, dist.reduce_scatter_single = real["all_reduce"], real["reduce_scatter"]
            weights = flat_weights(engine)
            runs[way] = {"losses": losses, "norms": norms, "bytes": dict(sent), "weights": weights,
                         "scattering": scattering, "param_bytes": sum(p.numel() * 4 for p in engine.engine.module.parameters())}
            engine.close()
        grad_scatter.install, engine_mod.ds_config = install, config
        engine = Engine(cfg, make_layout(cfg))  # a fresh engine from Kiln's step-2 checkpoint
        engine.load(ckpt)
        resumed_loss, _ = _scatter_step(engine, cfg, 2)
        resumed = flat_weights(engine)
        engine.close()
        a, b = runs["kiln"], runs["deepspeed"]
        row = {"scatter_layout": layout, "rank": dist.get_rank(), "kiln_scatters": a["scattering"],
               "deepspeed_scatters": b["scattering"], "losses": [a["losses"], b["losses"]],
               "norms": [a["norms"], b["norms"]], "weights_max_diff": float((a["weights"] - b["weights"]).abs().max()),
               "resumed_loss": [resumed_loss, a["losses"][2]], "resumed_weights_equal": torch.equal(resumed, a["weights"]),
               "kiln_bytes": a["bytes"], "deepspeed_bytes": b["bytes"], "fp32_grad_bytes": a["param_bytes"]}
        print_all(row)
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil

        shutil.rmtree(work)


def syncs(out: str, corpus: str) -> None:
    """Count the device-to-host reads (Tensor.item / float(tensor)) made by Kiln's training code, per step."""
    import pipeline.parallel.engine as engine_mod
    from pipeline.train import train

    events: list = []
    ours = (str(ROOT / "pipeline" / "train.py"), str(ROOT / "pipeline" / "parallel" / "engine.py"))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if sys._getframe(1).f_code.co_filename in ours:
                events.append("sync")
            return real(self, *a, **k)
        return wrapper

    torch.Tensor.item, torch.Tensor.__float__ = counting("item"), counting("__float__")
    step = engine_mod.Engine.train_step

    def marking(self, batches):
        events.append("step")
        return step(self, batches)

    engine_mod.Engine.train_step = marking
    cfg = load_config("train", TINY, [f"data.paths=[{corpus}]", f"out={out}", "train.steps=6", "train.log_every=3",
                                      "checkpoint.every=100", "tracking.enabled=false"])
    train(cfg)
    per_step: list[int] = []
    for e in events:
        if e == "step":
            per_step.append(0)
        elif per_step:
            per_step[-1] += 1
    print(json.dumps({"syncs_after_step": per_step}), flush=True)


if __name__ == "__main__":
    import gc

    # the imports' objects never become garbage: DeepSpeed's forced memory reports (a full gc.collect each)
    # then skip them
    gc.freeze()
    probes = {"accum": lambda *stages: accum([int(s) for s in stages]), "pipe": pipe, "syncs": syncs,
              "partition": partition, "zero3init": zero3init, "scatter": scatter}
    argv = sys.argv[1:]
    while argv:  # several probes in one process: `accum 1 2 + syncs OUT CORPUS`
        cut = argv.index("+") if "+" in argv else len(argv)
        (mode, *args), argv = argv[:cut], argv[cut + 1:]
        probes[mode](*args)
