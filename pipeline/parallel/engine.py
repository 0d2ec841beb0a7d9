"""One object that trains a step, whatever the layout: DeepSpeed's plain or pipeline engine.

PP = 1: the (TP-sharded) GPT goes through `deepspeed.initialize` with ZeRO 0-3;
each micro-batch is forward/backward/step (DeepSpeed accumulates and steps at
the boundary). PP > 1: a `PipelineModule` and `engine.train_batch` (1F1B).
Either way the model is materialized in place, this rank's slice only, already
on its device and in its training dtype (materialize.py); under ZeRO-3 each
parameter is partitioned as soon as it exists.
The optimizer (AdamW or Muon) comes from optimizer.py; the learning rate is set
by Kiln every step, so the schedule is a pure function of the step number. At
fp32, ZeRO-1/2's "fp32 master" partition is the weights' own partition, not a
clone (share_fp32_master).

`save` writes DeepSpeed's state and this rank's slice of the plain weights, and
returns the sha256 of every file this rank wrote, computed while writing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import KilnError, RunConfig, grad_accum
from pipeline.model.io import weights_only_loads
from pipeline.model.weights import SHARDS_DIR, Weights, write_shard
from pipeline.parallel import grad_scatter
from pipeline.parallel.materialize import build_gpt, local_slices
from pipeline.parallel.topology import Layout

BUCKET_ELEMENTS = 50_000_000
# DeepSpeed's throughput timer is on by default and synchronizes the device at the start and end of every
# micro-batch's forward; Kiln times its own steps (and reads device values on log steps only)
QUIET_TIMERS = {"throughput": {"enabled": False, "synchronized": False}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_state_types() -> list[type]:
    """The non-tensor classes inside DeepSpeed's optimizer-state files (ZeRO stage, loss scaler, bf16
    fragment addresses): plain data, safe to admit to a weights-only load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def bf16_grads(cfg: RunConfig, dp: int) -> bool:
    """bf16 gradients with nothing to sum: one micro-batch a step, no pipeline. Kept to the layouts checked so far
    (AdamW; data parallelism: tests/test_engine_precision.py; TP=2 x DP=2 with clipping active: the same losses
    and grad norms as the fp32 sum, to bf16's precision); expert parallelism and Muon sum in fp32."""
    p = cfg.parallel
    return (cfg.train.precision == "bf16" and grad_accum(cfg, dp) == 1 and p.pp == 1 and p.ep == 1
            and cfg.train.optimizer == "adamw")


def ds_config(cfg: RunConfig, dp: int, gpu: bool = False) -> dict:
    """DeepSpeed's config for this run. `gpu`: overlap ZeRO's gradient reduction with backward (on CPU/gloo
    there is no second stream to overlap on)."""
    t, p = cfg.train, cfg.parallel
    accum = grad_accum(cfg, dp)
    # Buckets bounded like Megatron's DDP (40M elements): DeepSpeed's default 5e8 is 2 GB of fp32 per rank
    # in ZeRO-1/2's reduce buffer (allocated whole under PP), more than a small rank's whole share.
    # Stage 1 keeps whole gradients anyway: a contiguous copy of them (ZeRO-2's layout) would only add 4 bytes a
    # parameter to the step's peak.
    zero: dict = {"stage": p.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS,
                  "contiguous_gradients": p.zero_stage >= 2 or p.ep > 1, "overlap_comm": gpu and p.zero_stage >= 1}
    # (expert parallelism: stage 1's other reduction path averages the experts' gradients over their
    # expert-data-parallel group alone, ep times too large; the contiguous path averages over all dp ranks)
    if p.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * dp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # immediate_grad_update: BF16_Optimizer adds each parameter's bf16 gradient into its fp32 sum as soon as
        # backward has it, and frees it (by default every bf16 gradient lives until the step: 2 more bytes a
        # parameter than the fp32 sum alone, which is Megatron's distributed optimizer's 4)
        "bf16": {"enabled": t.precision == "bf16", "immediate_grad_update": True},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "timers": QUIET_TIMERS,
        "dump_state": False,
    }
    if t.precision == "bf16":
        # bf16 weights, fp32 master weights, gradients reduced over DP in fp32 (as Megatron does), and summed over
        # micro-batches in fp32: stage 1 and PP -> DeepSpeed's BF16_Optimizer (a whole fp32 gradient buffer per
        # rank, as Megatron's; reduce-scattered: grad_scatter.py), 2/3 -> ZeRO's fp32 partitions. With one
        # micro-batch a step there is no sum (`bf16_grads`): the gradients stay bf16, and after the reduction
        # each rank keeps its 1/dp partition of them. Stage 0 has no such path in DeepSpeed; RunConfig refuses
        # bf16 there.
        config["data_types"] = {"grad_accum_dtype": "bf16" if bf16_grads(cfg, dp) else "fp32"}
        config["communication_data_type"] = "fp32"
    if p.sequence_parallel and p.pp > 1:
        # DeepSpeed's pipe sends each TP rank 1/tp of an activation it assumes all TP ranks share, and gathers it
        # on arrival; sequence-parallel activations differ per TP rank (each its own 1/tp already): send them whole
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return config


def share_fp32_master(optimizer) -> bool:
    """ZeRO-1/2 clones this rank's partition of the flat weights as the optimizer's master copy. When the
    weights are already fp32 (and not offloaded) the clone is a pure duplicate, 4 bytes a parameter: point
    the master at the partition itself (DeepSpeed's after-step copy master -> weights becomes a no-op) and
    relink DeepSpeed's fragment maps to it. Returns whether it did."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    pairs = [(parts[dist.get_rank(group=group)], master) for parts, group, master in
             zip(optimizer.parallel_partitioned_bit16_groups, optimizer.real_dp_process_group,
                 optimizer.single_partition_of_fp32_groups, strict=True)]
    if any((own.dtype, own.device, own.shape) != (master.dtype, master.device, master.shape) for own, master in pairs):
        return False
    for own, master in pairs:
        master.data = own.data
    optimizer._link_all_hp_params()
    return True


def _grad_norm_and_clip(engine, max_norm: float, layout: Layout) -> torch.Tensor:
    """Global grad norm, each parameter counted once across TP and pipeline replicas; clips in place.
    Returns the norm as a tensor on the device: reading it waits for the GPU (the loop does so on log steps)."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    counted = [p.grad for p in params if getattr(p, "model_parallel", True)
               and not getattr(p, "ds_pipe_replicated", False) and getattr(p, "allreduce", True)]
    norm = torch.nn.utils.get_total_norm(counted) if counted else torch.zeros((), device=engine.device)
    experts = [p for p in params if getattr(p, "allreduce", True) is False]  # this EP rank's experts only
    if experts:
        from deepspeed.utils import groups

        sq = torch.nn.utils.get_total_norm([p.grad for p in experts]).float().pow(2)
        dist.all_reduce(sq, group=groups._get_expert_parallel_group(experts[0].group_name))
        norm = (norm.float().pow(2) + sq).sqrt()
    if layout.tp * layout.pp > 1:
        sq = norm.float().pow(2)
        dist.all_reduce(sq, group=layout.grid.get_model_parallel_group())
        norm = sq.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class Engine:
    """Wraps the DeepSpeed engine: train_step, evaluate, save (with this rank's weight slices), load."""

    def __init__(self, cfg: RunConfig, layout: Layout, source: Weights | None = None):
        """`source`: start from these weights (train.init_from, a resume at another layout), else from the seed."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.layout = cfg, layout
        self.pipe = layout.pp > 1
        self.zero3 = cfg.parallel.zero_stage == 3
        device = torch.device(get_accelerator().current_device_name())
        dtype = DTYPES[cfg.train.precision]
        t = cfg.train
        config = ds_config(cfg, layout.dp, gpu=device.type == "cuda")
        if self.pipe:
            from pipeline.parallel.pipeline_module import build_pipeline_module

            model = build_pipeline_module(cfg, layout, device, dtype, source)
        else:
            zero3 = None
            if self.zero3:  # partition each parameter as soon as it is filled (DeepSpeed's zero.Init, not entered)
                zero3 = deepspeed.zero.Init(data_parallel_group=layout.dp_group, config_dict_or_path=config,
                                            mpu=layout.grid, dtype=dtype)
            model = build_gpt(cfg.model, t.seed, layout, cfg, device, dtype, source, zero3)
        from pipeline.parallel import optimizer as optim

        client, groups = optim.build(cfg, model, layout, device, config)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client, model_parameters=groups, config=config,
            mpu=None if self.pipe else layout.grid,
        )
        self.optimizer = self.engine.basic_optimizer  # the torch optimizer whose groups set_lr sets
        share_fp32_master(self.engine.optimizer)
        grad_scatter.install(self.engine)
        self.grad_norm: torch.Tensor | float | None = None
        if not self.pipe and cfg.parallel.zero_stage == 0 and layout.dp == 1:
            self.engine.enable_backward_allreduce = False  # nothing to average: skip flatten/copy/unflatten
        if self._kiln_clips:
            self.engine.clip_fp32_gradients = self._clip  # DeepSpeed computes but drops the norm here
        self.accum = self.engine.gradient_accumulation_steps()

    @property
    def _ds_muon(self) -> bool:
        return self.cfg.train.optimizer == "muon" and self.cfg.parallel.zero_stage > 0

    @property
    def _kiln_clips(self) -> bool:
        return self.cfg.parallel.zero_stage == 0 and self.cfg.train.precision == "fp32"

    def _clip(self) -> None:
        self.grad_norm = _grad_norm_and_clip(self.engine, self.cfg.train.grad_clip, self.layout)

    @property
    def device(self):
        return self.engine.device

    def set_lr(self, lr: float) -> None:
        """`lr` (the schedule's rate for train.lr) for AdamW's groups; Muon's hidden matrices scaled alike."""
        t = self.cfg.train
        for g in self.optimizer.param_groups:
            g["lr"] = lr * t.muon_lr / t.lr if g.get("muon") or g.get("use_muon") else lr

    def to_device(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Host batches onto the device (those already there stay); on a GPU through pinned memory and without
        waiting for the copy, so the next step's batches travel while this step computes."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.device == self.device:
                return t
            if self.device.type == "cuda":
                return t.pin_memory().to(self.device, non_blocking=True)
            return t.to(self.device)

        return [(move(x), move(y)) for x, y in batches]

    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over this rank's micro-batches (on the device: `to_device`). Returns this rank's
        mean loss and the global grad norm (None if unknown) as device tensors, never read here: reading them
        waits for the GPU, so the loop does that once per log step (`read`)."""
        self.engine.train()
        self.grad_norm = None
        batches = self.to_device(batches)  # a no-op for the loop's batches, already moved (prefetched)
        if self.pipe:  # the pipe engine's loss is already averaged over DP
            loss = self.engine.train_batch(data_iter=iter(batches)).detach().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=self.device)
            for x, y in batches:
                _, loss = self.engine(x, y)
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().float()
            loss = total / len(batches)
        if not self._kiln_clips and not self._ds_muon:
            self.grad_norm = self.engine.get_global_grad_norm()  # (DeepSpeed's Muon: the update's norm; not logged)
        return loss, self.grad_norm

    def read(self, loss: torch.Tensor, grad_norm) -> tuple[float, float | None]:
        """Collective (DP) and a host sync: the global batch's mean loss and the grad norm as numbers."""
        if self.layout.dp > 1 and not self.pipe:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.layout.dp_group)
            loss /= self.layout.dp
        return loss.item(), None if grad_norm is None else float(grad_norm)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over this rank's validation batches, averaged over DP ranks."""
        batches = self.to_device(batches)
        if self.pipe:
            loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches)).detach().float()
        else:
            self.engine.eval()
            loss = torch.stack([self.engine(x, y)[1].detach().float() for x, y in batches]).mean()
        if self.layout.dp > 1:
            dist.all_reduce(loss, group=self.layout.dp_group)
            loss /= self.layout.dp
        self.engine.train()
        return loss.item()

    def save(self, directory) -> dict[str, str]:
        """Collective. Write DeepSpeed's state under `directory/ds` and this rank's weight slices under
        `directory/weights/`; return {path relative to directory: sha256} of the files this rank wrote."""
        directory = Path(directory)
        written = save_deepspeed(self.engine, directory)
        slices = local_slices(self.engine.module, self.layout, self.zero3)
        if slices:
            rel = f"{SHARDS_DIR}/rank_{self.layout.rank:05d}.safetensors"
            (directory / SHARDS_DIR).mkdir(exist_ok=True)
            written[rel] = write_shard(directory / rel, slices)
        return written

    def close(self) -> None:
        """Release the model, gradients and optimizer state (before the MODEL dir is written)."""
        import gc

        self.engine.destroy()
        del self.engine, self.optimizer
        gc.collect()

    def load(self, directory) -> None:
        load_deepspeed(self.engine, directory)


def save_deepspeed(engine, directory: Path) -> dict[str, str]:
    """Collective. DeepSpeed's state of `engine` under `directory/ds`: {path relative to directory: sha256}
    of the files this rank wrote, hashed while written."""
    written: dict[str, str] = {}
    with _hashing_saves(engine, directory, written):
        engine.save_checkpoint(str(directory), tag="ds", save_latest=False)
    return written


def load_deepspeed(engine, directory) -> None:
    """DeepSpeed unpickles its state files with weights_only=False; Kiln forces weights-only loading and
    admits just the few plain DeepSpeed types those files hold, so a planted pickle is refused."""
    with weights_only_loads(f"{directory}/ds", deepspeed_state_types()):
        path, _ = engine.load_checkpoint(str(directory), tag="ds", load_lr_scheduler_states=False)
    if path is None:
        raise KilnError(f"{directory}/ds: DeepSpeed found no loadable checkpoint there")


class _HashWriter:
    """A file object that hashes what passes through it (torch.save writes sequentially)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class _hashing_saves:
    """While DeepSpeed saves, its (torch) checkpoint engine writes through `_HashWriter`: every file it writes
    for this rank is hashed on the way out, never read back. Any other checkpoint engine is left alone; what
    nobody hashed is hashed by rank 0 when it publishes the checkpoint (checkpoint.py)."""

    def __init__(self, engine, root: Path, written: dict[str, str]):
        self.ce, self.root, self.written = engine.checkpoint_engine, root.resolve(), written

    def _save(self, state_dict, path: str) -> None:
        with open(path, "wb") as f:
            w = _HashWriter(f)
            torch.save(state_dict, w, _use_new_zipfile_serialization=self.ce.zipfile_serialization)
            f.flush()
            os.fsync(f.fileno())
        self.written[Path(path).resolve().relative_to(self.root).as_posix()] = w.sha.hexdigest()

    def __enter__(self):
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        self.active = type(self.ce) is TorchCheckpointEngine
        if self.active:
            self.ce.save = self._save
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            del self.ce.save
