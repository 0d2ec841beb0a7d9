"""`kiln distill`: knowledge distillation of a teacher MODEL into a smaller student, with Accelerate.

loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1−α)·CE(student, data)
       + hidden_weight·(1 − cos(student final hidden, teacher final hidden))
(Hinton et al. 2015; DistilBERT/DistilGPT2 add the cosine term and start the student from every
k-th teacher layer.) The steps are the post-training loop's (pipeline/post/loop.py): one CPU process (tests)
or many with `accelerate launch` or torchrun; every step's global batch depends only on (seed, step), each
rank takes its slice, so resuming from OUT/checkpoints continues exactly where the run stopped.

Output layout, like training: OUT/model (the MODEL dir), OUT/checkpoints/step_NNNNNNN (training's kill-safe,
checksummed protocol: pipeline/checkpoint.py), OUT/metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, DistillConfig, ModelConfig, build, load_yaml
from pipeline.console import log
from pipeline.device import autocast
from pipeline.evaluate import evaluate_windows
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir, sha256_file
from pipeline.model.weights import weights_file
from pipeline.post import loop
from pipeline.post.common import WindowsTask, lineage, load_parent, parent_tokenizer
from pipeline.post.zero import accelerator_for


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


# --------------------------------------------------------------------------- the task the loop steps


class DistillTask(WindowsTask):
    """pipeline/post/loop.py's task: the random windows of plain training (WindowsTask: from (seed, step)), the
    student's loss against the teacher's soft targets and the data."""

    def __init__(self, cfg: DistillConfig, teacher: GPT, student: GPT, data_dir: str | Path, identity: dict):
        t = cfg.train
        super().__init__(data_dir, student.cfg.block_size, t.micro_batch_size, t.grad_accum or 1, t.seed, identity)
        self.cfg, self.teacher = cfg, teacher
        self.s_hidden, self.t_hidden = FinalHidden(student), FinalHidden(teacher)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        t_logits = teacher_logits(self.teacher, batch["x"])
        s_logits, _ = model(batch["x"])
        c = self.cfg
        return distill_loss(s_logits, t_logits, batch["y"], c.alpha, c.temperature, self.s_hidden.value,
                            self.t_hidden.value, c.hidden_weight)


def distill(teacher_ref: str | Path, student_yaml: str | Path, data_dir: str | Path, out: str | Path,
            cfg: DistillConfig) -> dict:
    """Distil, checkpointing to OUT/checkpoints (resumed when present); returns the summary dict."""
    from accelerate.utils import set_seed

    tc = cfg.train
    accelerator = accelerator_for(tc, cfg.parallel.zero_stage)
    out = Path(out)
    teacher, _, parent = load_parent(teacher_ref)  # safetensors wants "cpu", not accelerate's "cpu:0"
    teacher = teacher.to(accelerator.device)
    teacher.requires_grad_(False)
    scfg = student_config(student_yaml, teacher.cfg)
    if cfg.hidden_weight > 0 and scfg.n_embd != teacher.cfg.n_embd:
        raise ConfigError(f"hidden_weight: {cfg.hidden_weight} needs student n_embd == teacher's ({teacher.cfg.n_embd})")
    set_seed(tc.seed)
    student = GPT(scfg)
    used = init_from_teacher(student, teacher, cfg.layer_stride)
    identity = {"teacher_sha256": sha256_file(parent / weights_file(parent)), "student": scfg.model_dump(mode="json"),
                "seed": tc.seed, **({"zero_stage": cfg.parallel.zero_stage} if cfg.parallel.zero_stage else {})}
    task = DistillTask(cfg, teacher, student, data_dir, identity)
    result = loop.run(student, task, tc, accelerator=accelerator, checkpoints=out / "checkpoints",
                      every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, metrics=out / "metrics.jsonl",
                      name="distill")
    summary = {"out": str(out), "model": str(out / "model"), "teacher": str(parent), "steps": tc.steps,
               "resumed_from": result.start, "processes": result.world, "init_layers": used,
               "params": student.num_params(), "teacher_params": teacher.num_params()}
    if result.is_main:
        meta = lineage(parent, "distilled", "kd", alpha=cfg.alpha, temperature=cfg.temperature,
                       hidden_weight=cfg.hidden_weight, layer_stride=cfg.layer_stride, init_layers=used,
                       steps=tc.steps, seed=tc.seed, data=str(data_dir))
        save_model_dir(student, scfg, out / "model", parent_tokenizer(parent), meta)
        if cfg.eval_windows:
            summary["val_loss"] = evaluate_windows(student, data_dir, cfg.eval_windows)["loss"]  # on the device
            summary["teacher_val_loss"] = evaluate_windows(teacher, data_dir, cfg.eval_windows)["loss"]
        summary.update({k: result.last[k] for k in ("loss", "kl", "ce") if k in result.last})
    return summary
