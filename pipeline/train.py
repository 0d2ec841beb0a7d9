"""`kiln train`: the training loop. Reads like nanoGPT's; parallelism lives in pipeline/parallel/.

    data (blended, seeded sample index) -> Engine.train_step (DeepSpeed: ZeRO / TP / PP)
        -> metrics.jsonl + console every log_every steps, validation every eval_every,
        -> checkpoints every checkpoint.every (and at the end), -> OUT/model/

Rerunning the same command resumes from the newest complete checkpoint; the result is the
same, bit for bit on CPU fp32, as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    find_checkpoint,
    load_weights,
    pretrain_meta,
    read_state,
    restore_rng,
    save_checkpoint,
    trim_metrics,
    weights_only,
)
from pipeline.config import ConfigError, KilnError, RunConfig, first_line
from pipeline.console import log, progress
from pipeline.data.sampler import TrainData, rank_slice
from pipeline.device import measured_peak_flops, use_cpu_threads
from pipeline.evaluate import bits_per_byte
from pipeline.model.flops import flops_per_token
from pipeline.model.parallel_save import save_model_dir_parallel
from pipeline.model.weights import open_weights
from pipeline.parallel.engine import Engine, bf16_grads
from pipeline.parallel.topology import init_distributed, make_layout
from pipeline.plan import gpu_peak_flops
from pipeline.preflight import check_resume, check_vocab
from pipeline.schedule import lr_of, on_resume, schedule_of


def peak_flops(cfg: RunConfig, world: int) -> float:
    """Peak FLOP/s of the whole job: config, else a GPU's bf16 spec, else the measured CPU matmul peak."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops * (world if torch.cuda.is_available() else 1)
    if torch.cuda.is_available():
        spec = gpu_peak_flops(torch.cuda.get_device_name())
        if spec and cfg.train.precision != "fp32":
            return spec * world
        return measured_peak_flops(torch.float32 if cfg.train.precision == "fp32" else torch.bfloat16,
                                   4096, "cuda") * world
    # CPU: one process's measured peak, times the processes the cores can run side by side
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    procs = max(1, min(world, cores // torch.get_num_threads()))
    return measured_peak_flops() * procs


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _broadcast(obj):
    if dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _layout_key(cfg: RunConfig, world: int) -> dict:
    p = cfg.parallel
    ep = {"ep": p.ep} if p.ep > 1 else {}  # (checkpoints from before expert parallelism keep their key)
    # bf16 gradients at one micro-batch pick another DeepSpeed optimizer than an fp32 sum: its state is another's
    grads = {"grad_accum_dtype": "bf16"} if bf16_grads(cfg, world // (p.tp * p.pp)) else {}
    return {"tp": p.tp, "pp": p.pp, **ep, "zero_stage": p.zero_stage, "world": world, "precision": cfg.train.precision,
            **grads}


def _open_data(cfg: RunConfig, layout) -> TrainData:
    """Every rank opens the manifests; the shards are checked by size, header and fingerprint, each rank its
    share (O(shards / world) opens); `data.verify: full` also hashes every byte, split the same way."""
    data = TrainData(cfg.data, cfg.model.block_size, cfg.train.seed, rank=layout.rank, world=layout.world)
    if cfg.data.verify == "full":
        data.verify_full(rank=layout.rank, world=layout.world)
    return data


def _val_text(metrics: dict) -> str:
    """' val 2.3456 (1.2345 bpb)' on evaluation steps, for the console line."""
    if "val_loss" not in metrics:
        return ""
    bpb = f" ({metrics['val_bpb']:.4f} bpb)" if "val_bpb" in metrics else ""
    return f" val {metrics['val_loss']:.4f}{bpb}"


def _eval_batches(cfg: RunConfig, layout, data: TrainData) -> int:
    """Micro-batches per rank per validation: the first windows of data.val_tokens (at most train.eval_batches
    micro-batches in all), in whole global eval batches, so every layout evaluates the same windows.
    A validation set smaller than one global eval batch is a config error, never a silent skip."""
    t = cfg.train
    if not t.eval_every:
        return 0
    per_batch = t.micro_batch_size * layout.dp
    have, block = len(data.val), cfg.model.block_size
    if have < per_batch:
        raise ConfigError(
            f"data.val_tokens: validation holds {have} windows of {block} tokens ({have * block:,} tokens: "
            f"data.val_tokens={cfg.data.val_tokens:,}, the corpora's val splits hold {data.val_available:,} windows), "
            f"but one evaluation batch needs micro_batch_size {t.micro_batch_size} x dp {layout.dp} = {per_batch} "
            f"windows ({per_batch * block:,} tokens); raise data.val_tokens or set train.eval_every=0")
    if data.val_available < data.val_requested and layout.rank == 0:
        log.warning("data.val_tokens asks for %d windows of %d tokens; the corpora's val splits hold %d",
                    data.val_requested, block, data.val_available)
    if t.eval_batches:  # a cap on the windows evaluated, the same whatever the layout
        have = max(per_batch, min(have, t.eval_batches * t.micro_batch_size))
    return have // per_batch


def _schedule(cfg: RunConfig, resume: Path | None, step: int) -> dict:
    """The learning-rate schedule this run follows: the config's, or on a resume what schedule.on_resume decides
    (said in one line before the first step when the config asks for another than the checkpoint's)."""
    configured = schedule_of(cfg.train.model_dump())
    if resume is None:
        return configured
    state = read_state(resume)
    recorded = state.get("schedule") or schedule_of({**cfg.train.model_dump(), **state.get("config", {}).get("train", {})})
    chosen, line = on_resume(recorded, configured, step)
    if line and dist.get_rank() == 0:
        log.warning("%s", line)
    return chosen


def _starting_point(cfg: RunConfig, layout, data: TrainData, resume: Path | None):
    """(step, consumed samples, elapsed s, same layout?, weights to start from or None)."""
    if resume is None:
        if not cfg.train.init_from:
            return 0, 0, 0.0, False, None
        from pipeline.export import resolve_verified

        source = resolve_verified(cfg.train.init_from, weights_only, collective=True)  # each rank hashes a share
        log.info("starting from the weights of %s", source)
        return 0, 0, 0.0, False, load_weights(source, verified=True)
    state = read_state(resume)
    check_resume(cfg, resume, state, data.digests)
    here = _layout_key(cfg, layout.world)
    same_layout = state.get("layout") == here
    source = None
    if not same_layout:
        log.warning("%s was saved with layout %s; continuing at %s from its consolidated weights "
                    "(optimizer state starts fresh)", resume, state.get("layout"), here)
        source = open_weights(resume)  # verified with the whole checkpoint by find_checkpoint
    return state["step"], state["consumed_samples"], state.get("elapsed_s", 0.0), same_layout, source


def train(
    cfg: RunConfig,
    on_log: Callable[[int, dict], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    on_end: Callable[[Path], None] | None = None,
) -> dict:
    """Train (or resume) the run described by `cfg`; callbacks fire on rank 0 only."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); use bf16 or fp32")
    init_distributed(cfg.train.collective_timeout_s)
    if not torch.cuda.is_available():  # the node's cores shared out over its processes (or OMP_NUM_THREADS)
        use_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        return _train(cfg, on_log, on_checkpoint, on_end)
    except RuntimeError as err:
        lost = _lost_peer(err)
        if lost is None:
            raise
        raise KilnError(f"rank {dist.get_rank()} of {dist.get_world_size()}: {lost} "
                        f"(train.collective_timeout_s={cfg.train.collective_timeout_s:g}): {first_line(err)}") from None


# gloo's words, then NCCL's (its watchdog, with TORCH_NCCL_ASYNC_ERROR_HANDLING=2: topology.NCCL_ENV)
_TIMEOUT_MARKS = ("timed out", "collective operation timeout")
_PEER_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe",
               "remote process exited", "communicator was aborted", "network error")


def _lost_peer(err: RuntimeError) -> str | None:
    """A collective that failed because another rank stopped answering, said in words; else None."""
    if isinstance(err, KilnError | ConfigError):
        return None
    text = str(err).lower()
    if any(m in text for m in _TIMEOUT_MARKS):
        return "a collective got no answer in time; another rank is hung or dead"
    if any(m in text for m in _PEER_MARKS):
        return "another rank closed its connection (it died)"
    return None


def _train(cfg: RunConfig, on_log, on_checkpoint, on_end) -> dict:
    layout = make_layout(cfg)
    rank0 = layout.rank == 0
    t = cfg.train
    data = _open_data(cfg, layout)
    check_vocab(cfg, data.vocab_size)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    eval_batches = _eval_batches(cfg, layout, data)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    if rank0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(layout.dropout_seed(t.seed))  # dropout: same within a TP group, different across DP/PP

    # ---------------------------------------------------------------- resume or start
    resume = find_checkpoint(ckpt_root, collective=True)
    step, consumed, elapsed0, same_layout, source = _starting_point(cfg, layout, data, resume)
    engine = Engine(cfg, layout, source)
    if resume is not None and same_layout:
        engine.load(resume)
        restore_rng(resume)
    if resume is not None:
        log.info("resumed from %s (step %d, %d samples consumed)", resume, step, consumed)
    schedule = _schedule(cfg, resume, step)
    if rank0:  # a fresh start (e.g. every checkpoint was corrupt) must not append to old lines
        trim_metrics(metrics_path, step)

    global_batch = t.micro_batch_size * engine.accum * layout.dp
    tokens_per_step = global_batch * cfg.model.block_size
    fpt = flops_per_token(cfg.model)
    peak = _broadcast(peak_flops(cfg, layout.world) if rank0 else None)  # measured once, not by every rank at once
    base_state = {"config": cfg.model_dump(mode="json"), "data_digests": data.digests,
                  "layout": _layout_key(cfg, layout.world), "global_batch": global_batch, "schedule": schedule}
    log.info("%s | %s params | global batch %d x %d tokens | %d steps%s", layout.describe(),
             f"{sum(p.numel() for p in engine.engine.module.parameters()):,} local", global_batch,
             cfg.model.block_size, t.steps,
             "" if torch.cuda.is_available() else f" | {torch.get_num_threads()} CPU thread(s) per process")

    # val_bpb: the windows' summed loss (mean x target tokens) over their UTF-8 bytes, counted once (rank 0 logs)
    val_tokens = eval_batches * t.micro_batch_size * layout.dp * cfg.model.block_size
    val_bytes, why = None, "no tokenizer file in the corpus: no val_bpb"
    if rank0 and eval_batches:
        try:
            val_bytes = data.val_bytes(val_tokens // cfg.model.block_size)
        except (RuntimeError, OSError) as err:  # a metric never ends the run: sentencepiece could not read it
            why = f"the corpus's tokenizer is unreadable ({first_line(err)}): no val_bpb"
        log.info("validation: %d windows, %s target tokens, %s", val_tokens // cfg.model.block_size, f"{val_tokens:,}",
                 f"{val_bytes:,} bytes" if val_bytes else why)

    def evaluate() -> float:
        """Mean loss over the first val windows, the same whatever the layout (each DP rank takes a slice)."""
        mbs = t.micro_batch_size
        first = layout.dp_rank * eval_batches * mbs
        return engine.evaluate([data.val_batch(first + b * mbs, mbs) for b in range(eval_batches)])

    newest = resume

    def checkpoint(at: int) -> None:
        nonlocal newest
        newest = save_checkpoint(engine, ckpt_root, at, {**base_state, "consumed_samples": consumed,
                                                         "elapsed_s": elapsed0 + time.perf_counter() - t_start},
                                 cfg.checkpoint.keep)
        if rank0 and on_checkpoint:
            on_checkpoint(newest)

    def host_batches(at_consumed: int) -> list:
        return [data.train.batch(s, c) for s, c in
                rank_slice(at_consumed, global_batch, layout.dp, layout.dp_rank, t.micro_batch_size)]

    # ---------------------------------------------------------------- loop
    # The host never waits for the device inside a step: the loss and grad norm stay on the device and are read
    # (one sync) on log/eval steps only, and the next step's batches are copied while this step computes.
    t_start = time.perf_counter()
    t_last, tokens_last = t_start, 0
    last: dict = {}
    batches = engine.to_device(host_batches(consumed)) if step < t.steps else []
    with progress("train", total=t.steps, unit="step", disable=not rank0) as advance:
        advance(step)
        while step < t.steps:
            lr = lr_of(step, schedule)
            engine.set_lr(lr)
            loss_t, norm_t = engine.train_step(batches)
            step += 1
            consumed += global_batch
            tokens_last += tokens_per_step
            if step < t.steps:
                batches = engine.to_device(host_batches(consumed))  # queued behind this step's work
            advance(1)
            evaluating = t.eval_every and (step % t.eval_every == 0 or step == t.steps)
            if step % t.log_every == 0 or step == t.steps or evaluating:
                loss, grad_norm = engine.read(loss_t, norm_t)  # the step's one host sync
                t_done = time.perf_counter()  # tokens/s counts training only, not validation or saving
                val_loss = evaluate() if evaluating else None
                now = time.perf_counter()
                tps = tokens_last / max(t_done - t_last, 1e-9)
                last = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                        "tokens": consumed * cfg.model.block_size, "tokens_per_s": tps, "mfu": fpt * tps / peak,
                        "elapsed_s": elapsed0 + now - t_start, "memory_gb": memory_gb(),
                        "threads": torch.get_num_threads()}  # the CPU threads tokens_per_s was measured with
                if val_loss is not None:
                    last["val_loss"] = val_loss
                    if val_bytes:
                        last["val_bpb"] = bits_per_byte(val_loss * val_tokens, val_bytes)
                if rank0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    log.info("step %d/%d loss %.4f%s lr %.2e grad %.3f | %.0f tok/s | MFU %.1f%%", step, t.steps,
                             loss, _val_text(last), lr, grad_norm or 0.0,
                             tps, 100 * last["mfu"])
                    if on_log:
                        on_log(step, last)
                t_last, tokens_last = time.perf_counter(), 0
            if step % cfg.checkpoint.every == 0 or step == t.steps:
                checkpoint(step)
                t_last, tokens_last = time.perf_counter(), 0

    # ---------------------------------------------------------------- the MODEL dir
    # Every rank writes ~1/world of it, streamed tensor by tensor from the last checkpoint's weight slices
    # (model/parallel_save.py): no rank does O(model) work while the others wait in a collective.
    model_dir = out / "model"
    engine.close()
    tok = data.tokenizer
    save_model_dir_parallel(newest, cfg.model, model_dir, tok,  # (newest: rank 0's path; it tells the others)
                            pretrain_meta(read_state(newest), tok) if rank0 else None,
                            dtype=torch.float32 if t.model_dtype == "fp32" else None)
    if rank0:
        log.info("model written to %s", model_dir)
        if on_end:
            on_end(model_dir)
    if dist.get_world_size() > 1:
        dist.barrier()
    return {"out": str(out), "model_dir": str(model_dir), "steps": step, "loss": last.get("loss"),
            "val_loss": last.get("val_loss"), "val_bpb": last.get("val_bpb"), "tokens": consumed * cfg.model.block_size,
            "resumed_from": str(resume) if resume else None, "layout": layout.describe(), "schedule": schedule}
