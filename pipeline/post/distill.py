"""`kiln distill`: knowledge distillation of a teacher MODEL into a smaller student, with Accelerate.

loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, data)
       + hidden_weight·(1 − cos(student final hidden, teacher final hidden))
(Hinton et al. 2015; DistilBERT/DistilGPT2 add the cosine term and start the student from every
k-th teacher layer.) The same code runs in one CPU process (tests) or many with `accelerate launch`
or torchrun: every step's global batch depends only on (seed, step), each rank takes its slice, so
resuming from OUT/checkpoints continues exactly where the run stopped.

Output layout, like training: OUT/model (the MODEL dir), OUT/checkpoints/step_NNNNNNN (training's kill-safe,
checksummed protocol: pipeline/checkpoint.py), OUT/metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.checkpoint import (
    TorchState,
    find_checkpoint,
    read_state,
    restore_rng,
    save_checkpoint,
    trim_metrics,
)
from pipeline.config import ConfigError, DistillConfig, KilnError, ModelConfig, build, load_yaml
from pipeline.console import log, progress
from pipeline.device import autocast
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir, sha256_file
from pipeline.model.weights import weights_file
from pipeline.post.common import batch_at, lineage, load_parent, parent_tokenizer, windows
from pipeline.schedule import lr_of, schedule_of


def student_config(path: str | Path, teacher: ModelConfig) -> ModelConfig:
    """The `model:` section of a YAML; vocab_size and block_size default to the teacher's."""
    data = load_yaml(path)
    if not isinstance(data.get("model"), dict):
        raise ConfigError(f"{path}: needs a `model:` section (like configs/model/tiny.yaml)")
    model = {"vocab_size": teacher.vocab_size, "block_size": teacher.block_size, **data["model"]}
    cfg = build(ModelConfig, model, str(path))
    if cfg.vocab_size != teacher.vocab_size:
        raise ConfigError(f"{path}: model.vocab_size: {cfg.vocab_size} differs from the teacher's "
                          f"{teacher.vocab_size}; soft targets need the same vocabulary")
    if cfg.block_size > teacher.block_size:
        raise ConfigError(f"{path}: model.block_size: {cfg.block_size} exceeds the teacher's {teacher.block_size}")
    return cfg


def init_from_teacher(student: GPT, teacher: GPT, stride: int) -> list[int] | None:
    """DistilGPT2 recipe: student block i <- teacher block i*stride, embeddings and head copied.

    Needs the same width (every shape field but n_layer and block_size); otherwise the student keeps its random
    init and a warning says so. Returns the teacher layers used, or None."""
    # everything but depth and context length must match (a new ModelConfig field joins the check by itself)
    s, t = student.cfg, teacher.cfg
    sw, tw = ({k: v for k, v in c.shape().items() if k not in ("n_layer", "block_size")} for c in (s, t))
    if sw != tw:
        diff = ", ".join(f"{k} {sw[k]} vs {tw[k]}" for k in sw if sw[k] != tw[k])
        log.warning("student and teacher differ in width (%s): student starts from random init", diff)
        return None
    with torch.no_grad():
        student.embed.wte.weight.copy_(teacher.embed.wte.weight)
        if student.embed.wpe is not None:
            student.embed.wpe.weight.copy_(teacher.embed.wpe.weight[: s.block_size])
        student.head.load_state_dict(teacher.head.state_dict())
        used = [min(i * stride, t.n_layer - 1) for i in range(s.n_layer)]
        for i, j in enumerate(used):
            student.blocks[i].load_state_dict(teacher.blocks[j].state_dict())
    return used


class FinalHidden:
    """Captures the last block's output (works through DDP wrappers, unlike calling submodules)."""

    def __init__(self, model: GPT):
        self.value = None
        model.blocks[-1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = output


def teacher_logits(teacher: GPT, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, in bf16 autocast on a GPU (its weights stay fp32), fp32 on the CPU."""
    with torch.no_grad(), autocast(x.device):
        return teacher(x)[0]


def distill_loss(s_logits, t_logits, targets, alpha: float, temperature: float, s_hidden=None, t_hidden=None,
                 hidden_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    v = s_logits.size(-1)
    s_log = F.log_softmax(s_logits.float().view(-1, v) / temperature, dim=-1)
    t_log = F.log_softmax(t_logits.float().view(-1, v) / temperature, dim=-1)
    kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean")  # KL(teacher || student) per token
    ce = F.cross_entropy(s_logits.float().view(-1, v), targets.reshape(-1))
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    parts = {"kl": kl.item(), "ce": ce.item()}
    if hidden_weight > 0:
        cos = 1 - F.cosine_similarity(s_hidden.float(), t_hidden.float(), dim=-1).mean()
        loss = loss + hidden_weight * cos
        parts["cos"] = cos.item()
    return loss, parts


# --------------------------------------------------------------------------- the loop


def distill(teacher_ref: str | Path, student_yaml: str | Path, data_dir: str | Path, out: str | Path,
            cfg: DistillConfig) -> dict:
    """Distil, checkpointing to OUT/checkpoints (resumed when present); returns the summary dict."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tc = cfg.train
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[tc.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    device = accelerator.device
    out = Path(out)
    teacher, _, parent = load_parent(teacher_ref)  # safetensors wants "cpu", not accelerate's "cpu:0"
    teacher = teacher.to(device)
    teacher.requires_grad_(False)
    scfg = student_config(student_yaml, teacher.cfg)
    if cfg.hidden_weight > 0 and scfg.n_embd != teacher.cfg.n_embd:
        raise ConfigError(f"hidden_weight: {cfg.hidden_weight} needs student n_embd == teacher's ({teacher.cfg.n_embd})")
    set_seed(tc.seed)
    student = GPT(scfg)
    used = init_from_teacher(student, teacher, cfg.layer_stride)
    optimizer = torch.optim.AdamW(student.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    identity = {"teacher_sha256": sha256_file(parent / weights_file(parent)), "student": scfg.model_dump(mode="json"),
                "seed": tc.seed, "data": str(data_dir)}
    ckpt_dir, start = out / "checkpoints", 0
    metrics = out / "metrics.jsonl"
    resume = find_checkpoint(ckpt_dir, collective=True)  # newest whose checksums verify; a broken one is skipped
    if resume is not None:
        state = read_state(resume)
        if any(state.get(k) != v for k, v in identity.items() if k != "data"):
            raise KilnError(f"{resume}: checkpoint is from a different teacher/student/seed; use another --out")
        TorchState(student, optimizer).load(resume)
        restore_rng(resume)
        start = state["step"]
        log.info("resuming from %s (step %d)", resume, start)
    if accelerator.is_main_process:  # lines logged after the checkpoint are logged again; a fresh start has none
        trim_metrics(metrics, start)
    student, optimizer = accelerator.prepare(student, optimizer)
    s_hidden, t_hidden = FinalHidden(accelerator.unwrap_model(student)), FinalHidden(teacher)

    win = windows(data_dir, "train", scfg.block_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    out.mkdir(parents=True, exist_ok=True)
    t0, last = time.perf_counter(), {}
    accum = tc.grad_accum or 1
    tokens = start * tc.micro_batch_size * accum * world * scfg.block_size  # counted from step 0
    student.train()
    schedule = schedule_of(tc.model_dump())
    with progress("distill", total=tc.steps - start, unit="step", disable=not accelerator.is_main_process) as advance:
        for step in range(start, tc.steps):
            lr = lr_of(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_at(win, step, tc.micro_batch_size * accum, tc.seed, rank, world)
            optimizer.zero_grad(set_to_none=True)
            for xm, ym in zip(x.chunk(accum), y.chunk(accum), strict=True):
                xm, ym = xm.to(device), ym.to(device)
                t_logits = teacher_logits(teacher, xm)
                with accelerator.autocast():
                    s_logits, _ = student(xm)
                loss, parts = distill_loss(s_logits, t_logits, ym, cfg.alpha, cfg.temperature, s_hidden.value,
                                           t_hidden.value, cfg.hidden_weight)
                accelerator.backward(loss / accum)
            if tc.grad_clip:
                accelerator.clip_grad_norm_(student.parameters(), tc.grad_clip)
            optimizer.step()
            tokens += y.numel() * world
            last = {"step": step + 1, "loss": loss.item(), **parts, "lr": lr, "tokens": tokens,
                    "elapsed_s": round(time.perf_counter() - t0, 3)}
            if accelerator.is_main_process and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
                with metrics.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            done = step + 1
            if done % cfg.checkpoint.every == 0 or done == tc.steps:  # collective: every rank writes its RNG
                save_checkpoint(TorchState(accelerator.unwrap_model(student), optimizer), ckpt_dir, done, identity,
                                cfg.checkpoint.keep)
            advance(1)
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(student).eval()
    summary = {"out": str(out), "model": str(out / "model"), "teacher": str(parent), "steps": tc.steps,
               "resumed_from": start, "processes": world, "init_layers": used, "params": final.num_params(), "teacher_params": teacher.num_params()}
    if accelerator.is_main_process:
        meta = lineage(parent, "distilled", "kd", alpha=cfg.alpha, temperature=cfg.temperature,
                       hidden_weight=cfg.hidden_weight, layer_stride=cfg.layer_stride, init_layers=used,
                       steps=tc.steps, seed=tc.seed, data=str(data_dir))
        save_model_dir(final, scfg, out / "model", parent_tokenizer(parent), meta)
        if cfg.eval_windows:
            summary["val_loss"] = evaluate_windows(final, data_dir, cfg.eval_windows)["loss"]  # on the device
            summary["teacher_val_loss"] = evaluate_windows(teacher, data_dir, cfg.eval_windows)["loss"]
        summary.update({k: last[k] for k in ("loss", "kl", "ce") if k in last})
    return summary
