"""Typed configuration for every stage: schemas, `--set` overrides, one-line errors (YAML files and
`extends:` are read by pipeline/config_yaml.py).

Config mistakes should surface before a single process starts, as one line that
names the file and the key. Pydantic does the checking; this module turns its
errors into that line and adds the cross-field rules (parallel layout).
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

# The errors and the prep schema live in data_prep (the bottom layer); re-exported for the rest of the code.
from data_prep.config import BoilerplateConfig, DecontaminateConfig, MinHashConfig  # noqa: F401
from data_prep.config import PrepConfig as _PrepSchema
from data_prep.config import Strict as _Strict
from data_prep.errors import MAX_ERROR_CHARS, ConfigError, KilnError, clip, first_line  # noqa: F401
from pipeline.config_yaml import MAX_YAML_BYTES, MAX_YAML_VALUES, load_yaml, parse_override, safe_yaml  # noqa: F401
from pipeline.config_yaml import deep_merge as _deep_merge
from pipeline.credentials import has_credentials
from pipeline.families import FAMILIES
from pipeline.quant_methods import ALIASES, METHODS, bits_note

# --------------------------------------------------------------------------- model / training


class ModelConfig(_Strict):
    """The model's shape and init. Every field is a shape field (checked on resume, copied into exports)
    unless listed in NOT_SHAPE; sizes the layers use (head_dim, kv_heads, mlp_width) are derived here."""

    NOT_SHAPE: ClassVar[frozenset[str]] = frozenset({"dropout", "init_std", "moe_aux_loss_coef", "zero_init_proj"})
    RESOLVED: ClassVar[dict[str, str]] = {"n_kv_heads": "kv_heads", "ffn_hidden": "mlp_width"}  # default derived

    style: Literal[tuple(FAMILIES)] = Field("llama", description="the model family (pipeline/families/)")
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="key/value heads (grouped-query attention); default n_head")
    n_embd: int = Field(768, ge=8)
    block_size: int = Field(1024, ge=8)
    vocab_size: int | None = Field(None, ge=8, description="default: taken from the tokenizer")
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    ffn_hidden: int | None = Field(None, ge=8, description="MLP width; default the family's: 4*n_embd (gpt2), "
                                   "~8/3*n_embd rounded up to 64 (llama); 4*n_embd with mlp: relu2")
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    n_experts: int = Field(0, ge=0, description="routed experts per MLP (a family whose MLP is `moe`); 0: a dense MLP")
    experts_per_token: int = Field(2, ge=1, description="experts each token is routed to (top-k, gates renormalized)")
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the load-balancing loss (Switch/Mixtral) "
                                     "added to the training loss")
    moe_shared_hidden: int | None = Field(None, ge=8, description="width of a shared expert every token passes "
                                          "through (Qwen-MoE); default none")
    # architecture options (issue 27): each default is today's model, bit for bit
    qk_norm: bool = Field(False, description="RMSNorm over each head's queries and keys before rotary (Qwen3, "
                          "modded-nanogpt): a learned weight of head_dim")
    mlp: Literal["family", "relu2"] = Field("family", description="the MLP: the family's, or relu2: a non-gated "
                                            "down(relu(up(x))^2) (modded-nanogpt; default width 4*n_embd)")
    logit_softcap: float | None = Field(None, gt=0, description="logits = cap * tanh(logits / cap) wherever they are "
                                        "made (training loss, eval, generation; Gemma 2); default none")
    zero_init_proj: bool = Field(False, description="the residual branches' output projections (attention's and "
                                 "the MLP's) start at zero (modded-nanogpt); init only")

    @model_validator(mode="after")
    def _experts_fit_family(self) -> ModelConfig:
        routed = FAMILIES[self.style].mlp == "moe"
        if routed and (self.n_experts < 2 or self.experts_per_token > self.n_experts):
            raise ValueError(f"model.n_experts: {self.n_experts}: the {self.style} family routes each token to "
                             f"experts_per_token {self.experts_per_token} of n_experts, which needs n_experts >= 2 "
                             "and >= experts_per_token")
        if not routed and (self.n_experts or self.moe_shared_hidden):
            raise ValueError(f"model.n_experts / moe_shared_hidden: the {self.style} family has a dense MLP "
                             "(pick a family whose MLP is routed, e.g. style: mixtral)")
        if routed and self.mlp != "family":
            raise ValueError(f"model.mlp: {self.mlp}: the {self.style} family's MLP is a mixture of SwiGLU experts "
                             "(use mlp: family)")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_heads: {self.kv_heads} does not divide model.n_head {self.n_head}")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every field with derived defaults filled in (n_kv_heads None -> n_head, ...)."""
        return {k: getattr(self, self.RESOLVED.get(k, k)) for k in type(self).model_fields}

    def shape(self) -> dict[str, Any]:
        """The resolved fields that decide the weights and the function (what a resume must keep)."""
        return {k: v for k, v in self.resolved().items() if k not in self.NOT_SHAPE}

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def mlp_width(self) -> int:
        """ffn_hidden, or the default for n_embd: 4d for a non-gated MLP (relu2), else the family's (4d for GELU, 8d/3
        rounded up to 64 for SwiGLU)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.n_embd if self.mlp == "relu2" else FAMILIES[self.style].ffn_default(self.n_embd)


class ParallelConfig(_Strict):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload: Literal["none", "cpu"] = "none"
    micro_batches: int | None = Field(None, ge=1, description="pipeline micro-batches per step; default train.grad_accum")
    ep: int = Field(1, ge=1, description="expert parallelism: a mixture of experts' experts split over ep data-parallel "
                    "ranks (DeepSpeed's MoE layer, all-to-all); ep divides the data-parallel size and model.n_experts")
    partition: Literal["parameters", "uniform"] = "parameters"
    sequence_parallel: bool = Field(False, description="with tp > 1: norms and residuals hold 1/tp of the sequence "
                                    "(Megatron's sequence parallelism: all-gather / reduce-scatter in place of the TP "
                                    "all-reduces); cuts activation memory at tp >= 4")


class TrainConfig(_Strict):
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int | None = Field(None, ge=1, description="micro-batches each rank sums per step; default 1, "
                                   "or derived from global_batch_tokens")
    global_batch_tokens: int | None = Field(None, ge=1, description="tokens per optimizer step over all ranks, the same "
                                            "at any world size: grad_accum = this / (micro_batch_size x block_size x dp)")
    steps: int = Field(1000, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine", description="the learning rate after warmup: `cosine` decays to min_lr over all train.steps; `wsd` "
        "(warmup-stable-decay) holds lr, then decays linearly to min_lr over the last decay_frac of the steps, so a "
        "run extended (or decayed early) from any stable-phase checkpoint follows the same curve up to there")
    decay_frac: float = Field(0.2, gt=0, le=1, description="wsd: the share of train.steps spent decaying")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="`muon`: the transformer blocks' matrices step by Muon (orthogonalized momentum) at "
        "muon_lr, embeddings, head, norms and biases by AdamW at lr; ZeRO 0-2 (tp > 1 at stage 0 only)")
    muon_lr: float = Field(0.02, gt=0, description="muon: the hidden matrices' peak learning rate (the schedule "
                           "scales it as it scales lr)")
    muon_momentum: float = Field(0.95, gt=0, lt=1, description="muon: Nesterov momentum of the hidden matrices")
    muon_weight_decay: float = Field(0.0, ge=0, description="muon: decoupled weight decay of the hidden matrices")
    muon_ns_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="muon at zero_stage 0: Newton-Schulz arithmetic; auto: bf16 where the device multiplies "
        "it natively (GPUs, CPUs with AVX512-BF16/AMX: about half the time), else fp32")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    model_dtype: Literal["auto", "fp32"] = Field(
        "auto", description="the dtype of the MODEL dir written at the end: `auto` the weights' training dtype "
        "(bf16 stays bf16: fp32 would add bytes, not precision), `fp32` widened")
    seed: int = 1234
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="recompute in backward: `selective` the cheap element-wise ops (norms, rotary, "
        "activations; matmul and attention outputs kept), `full` whole blocks; true/false mean full/none")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0 disables periodic validation")
    eval_batches: int | None = Field(None, ge=1, description="cap on validation micro-batches (all ranks together); default: all of data.val_tokens")
    peak_flops: float | None = Field(None, gt=0, description="per-device peak for MFU; default: measured/known")
    init_from: str | None = Field(None, description="start from these weights: a checkpoint dir or a MODEL dir")
    compile: Literal["auto", "off", "blocks", "model"] = Field(
        "auto", description="torch.compile: `blocks` each transformer block on its own (regional: the blocks share "
        "one compiled graph, so a cold compile takes seconds at any depth), `model` the whole model with its loss "
        "in one graph (each pipeline stage's layer under PP); auto: blocks when CUDA is available; true/false "
        "mean blocks/off")
    loss_chunk: int = Field(4096, ge=0, description="tokens per chunk of the output layer + cross-entropy (the full "
                            "B x T x V logits are never built); 0: logits first, then the loss")
    collective_timeout_s: float = Field(1800, gt=0, description="a collective waiting longer (a hung or dead rank) ends the job")

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value):
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value):
        return {True: "blocks", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        return self


class DataConfig(_Strict):
    paths: list[str] = Field(default_factory=list, description="prep output directories")
    weights: list[float] | None = None
    val_tokens: int = Field(65536, ge=0)
    verify: Literal["fast", "full"] = Field("fast", description="shard check at start: size, header and fingerprint "
                                            "(fast) or every byte's sha256, split over the ranks (full)")
    max_open_shards: int = Field(64, ge=1, description="shards each corpus split keeps memory-mapped at once per "
                                 "process (opened on demand, least recently read closed first): bounds memory maps "
                                 "and file descriptors whatever the number of shards")

    @model_validator(mode="after")
    def _weights_match(self) -> DataConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(f"{len(self.weights)} weights for {len(self.paths)} paths")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be non-negative and not all zero")
        return self


class CheckpointConfig(_Strict):
    """OUT/checkpoints of train and distill, OUT.checkpoints of prune's recovery (pipeline/checkpoint.py)."""

    every: int = Field(100, ge=1, description="steps between checkpoints; one is also written at the last step")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")


class TrackingConfig(_Strict):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "kiln"
    register_as: str | None = Field(None, description="registered model name for this stage's output")
    alias: str | None = Field(None, description="registry alias set on the new version, e.g. champion, int8")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        """A config is stored with the run (params, checkpoints, manifests, model lineage)."""
        if uri and has_credentials(uri):
            raise ValueError("holds credentials, and configs are stored with every run; put them in "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or --tracking-uri)")
        return uri


class RunConfig(_Strict):
    """What `kiln train` reads."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    out: str = "runs/train"

    @model_validator(mode="after")
    def _layout_fits_model(self) -> RunConfig:
        p, m = self.parallel, self.model
        if m.n_head % p.tp or m.kv_heads % p.tp:
            raise ValueError(f"parallel.tp: {p.tp} does not divide model.n_head {m.n_head} and model.n_kv_heads "
                             f"{m.kv_heads} (each rank holds whole heads)")
        if p.sequence_parallel and (p.tp == 1 or m.block_size % p.tp or m.dropout):
            raise ValueError(f"parallel.sequence_parallel needs parallel.tp > 1 dividing model.block_size "
                             f"{m.block_size} and model.dropout 0 (tp {p.tp}, dropout {m.dropout})")
        if m.n_experts and (p.pp > 1 or p.sequence_parallel):
            raise ValueError("model.n_experts with parallel.pp > 1 or sequence_parallel: not yet (the load-balancing "
                             "loss does not cross pipeline stages; sequence-parallel ranks would route different tokens)")
        if p.ep > 1 and (not m.n_experts or m.n_experts % p.ep or m.experts_per_token != 2 or p.tp > 1 or p.zero_stage == 3):
            raise ValueError(f"parallel.ep: {p.ep} needs model.n_experts divisible by it ({m.n_experts}), "
                             f"experts_per_token 2 (DeepSpeed's top-2 gate; {m.experts_per_token}), tp 1 and "
                             f"zero_stage 0-2 (tp {p.tp}, zero_stage {p.zero_stage})")
        if p.ep > 1 and self.train.activation_checkpointing == "selective":
            raise ValueError("train.activation_checkpointing: selective with parallel.ep > 1: DeepSpeed's gate divides "
                             "a matmul's output in place, which selective checkpointing keeps; use full")
        if p.pp > 1 and m.n_layer % p.pp:
            raise ValueError(f"parallel.pp: {p.pp} does not divide model.n_layer {m.n_layer}")
        if p.pp > 1 and p.zero_stage >= 2:
            raise ValueError(
                f"parallel.zero_stage: {p.zero_stage} with parallel.pp {p.pp}: "
                "DeepSpeed's pipeline engine allows ZeRO 0 or 1"
            )
        if p.pp > 1 and p.zero_stage == 0 and self.train.precision == "bf16":
            raise ValueError("parallel.zero_stage: 0 with parallel.pp > 1 and bf16: DeepSpeed's bf16 pipeline "
                             "optimizer trains but cannot resume its own checkpoint; use parallel.zero_stage: 1")
        if self.train.optimizer == "muon":
            _muon_layout(p, m, self.train)
        if p.offload == "cpu" and p.zero_stage == 0:
            raise ValueError("parallel.offload: cpu needs parallel.zero_stage >= 1")
        if p.zero_stage == 0 and self.train.precision == "bf16":
            raise ValueError("parallel.zero_stage: 0 with bf16 would sum and reduce gradients in bf16 (DeepSpeed has "
                             "no fp32 accumulation at stage 0); use parallel.zero_stage: 1 (fp32 master weights and "
                             "gradients, also on one GPU)")
        return self


def _muon_layout(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> None:
    """Where Muon runs as it should (pipeline/parallel/optimizer.py): Kiln's at ZeRO stage 0 (any TP/PP/DP),
    DeepSpeed's at stage 1/2 on whole matrices. Anything else is refused rather than silently mis-stepped."""
    if p.zero_stage == 3 or p.offload != "none" or m.n_experts:
        raise ValueError(f"train.optimizer: muon runs at zero_stage 0-2 without offload, on dense models "
                         f"(zero_stage {p.zero_stage}, offload {p.offload}, n_experts {m.n_experts})")
    if p.zero_stage == 0:
        return
    if p.tp > 1 or p.pp > 1:
        raise ValueError(f"train.optimizer: muon with tp/pp > 1 runs at zero_stage 0 (Kiln's Muon gathers TP slices); "
                         f"DeepSpeed's ZeRO Muon would orthogonalize each slice alone (tp {p.tp}, pp {p.pp})")
    if t.precision == "bf16" and p.zero_stage == 1:
        raise ValueError("train.optimizer: muon with bf16 needs zero_stage 2: at stage 1 DeepSpeed's bf16 optimizer "
                         "would step flat partitions that Muon never orthogonalized")
    if t.grad_clip:
        raise ValueError(f"train.grad_clip: {t.grad_clip} with muon at zero_stage {p.zero_stage}: DeepSpeed's ZeRO "
                         "Muon would clip the orthogonalized update, not the gradient; set train.grad_clip: 0 "
                         "(Muon's update has a fixed scale) or zero_stage: 0")


def validate_world(cfg: RunConfig, world_size: int) -> int:
    """Check the layout against the launched world; return the data-parallel size."""
    mp = cfg.parallel.tp * cfg.parallel.pp
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {mp}"
        )
    dp = world_size // mp
    if dp % cfg.parallel.ep:
        raise ConfigError(f"parallel.ep: {cfg.parallel.ep} does not divide the data-parallel size {dp}")
    grad_accum(cfg, dp)
    return dp


def grad_accum(cfg: RunConfig, dp: int) -> int:
    """Micro-batches each rank sums per optimizer step (the pipeline's micro-batches under PP). With
    train.global_batch_tokens it is derived, so the global batch stays the same at any world size."""
    t, p = cfg.train, cfg.parallel
    key, given = ("parallel.micro_batches", p.micro_batches) if p.pp > 1 and p.micro_batches else \
        ("train.grad_accum", t.grad_accum)
    if t.global_batch_tokens is None:
        return given or 1
    per = t.micro_batch_size * cfg.model.block_size * dp
    derived, rest = divmod(t.global_batch_tokens, per)
    if rest or not derived:
        raise ConfigError(f"train.global_batch_tokens: {t.global_batch_tokens:,} is not a multiple of micro_batch_size "
                          f"{t.micro_batch_size} x block_size {cfg.model.block_size} x dp {dp} = {per:,} tokens")
    if given is not None and given != derived:
        raise ConfigError(f"{key}: {given} disagrees with train.global_batch_tokens {t.global_batch_tokens:,} / "
                          f"({t.micro_batch_size} x {cfg.model.block_size} x dp {dp}) = {derived}; set only one")
    return derived


# --------------------------------------------------------------------------- prep


class PrepConfig(_PrepSchema):
    """What `kiln prep` reads: data_prep's schema plus where the run is tracked."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- post-training


class QuantizeConfig(_Strict):
    method: Literal[tuple(METHODS)] = "int8-weight"  # type: ignore[valid-type]
    bits: int | None = Field(None, description=bits_note())
    group_size: int = Field(128, ge=0, description="0 = per output channel")
    act_order: bool = True
    damp: float = Field(0.01, gt=0, lt=1)
    calib: str | None = None
    calib_samples: int = Field(128, ge=1)
    calib_seq_len: int | None = Field(None, ge=8)
    quantize_head: bool = False
    seed: int = Field(0, description="which calibration windows are drawn")
    eval_windows: int = Field(64, ge=0, description="val windows of --calib scored before/after; 0 skips")
    device: Literal["cpu", "cuda"] = "cpu"
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _bits_from_method(cls, data: Any) -> Any:
        """bits defaults to the method's; the old names gptq4 / rtn4 become method + bits and may not disagree."""
        method = data.get("method", cls.model_fields["method"].default) if isinstance(data, dict) else None
        if not isinstance(method, str):
            return data  # pydantic says what is wrong with it
        if method in ALIASES:
            name, bits = ALIASES[method]
            if data.get("bits") not in (None, bits):
                raise ValueError(f"bits: {data['bits']} contradicts method {method} ({bits} bits); "
                                 f"write method: {name}, bits: {data['bits']}")
            return {**data, "method": name, "bits": bits}
        if data.get("bits") is None and method in METHODS:
            return {**data, "bits": METHODS[method].default_bits}
        return data

    @model_validator(mode="after")
    def _method_rules(self) -> QuantizeConfig:
        method = METHODS[self.method]
        low, high = method.bits
        if self.bits is None or not low <= self.bits <= high:
            span = f"{low}" if low == high else f"{low}..{high}"
            raise ValueError(f"bits: {self.method} takes {span} bits, not {self.bits}")
        if method.calibrated and not self.calib:
            raise ValueError(f"calib: {self.method} needs calibration data: pass --calib DIR (a `kiln prep` output)")
        return self


def _adamw_loop(train: TrainConfig, stage: str, schedules: tuple[str, ...]) -> None:
    """The post-training loops step AdamW (Muon is `kiln train`'s) on the schedules they know."""
    if train.optimizer != "adamw":
        raise ValueError(f"train.optimizer: {train.optimizer} is kiln train's; {stage}'s loop steps adamw")
    if train.schedule not in schedules:
        raise ValueError(f"train.schedule: {train.schedule}: {stage}'s loop follows {' or '.join(schedules)}")


class PostParallelConfig(_Strict):
    """Data parallelism of the post-training loop (pipeline/post/zero.py) over the processes it is launched with."""

    zero_stage: Literal[0, 1, 2] = Field(0, description="0: every process holds AdamW's state (DDP); 1: it is "
                                         "partitioned over the processes (DeepSpeed through Accelerate); 2: the "
                                         "gradients too")


class DistillConfig(_Strict):
    alpha: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(2.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0)
    layer_stride: int = Field(2, ge=1, description="student layer i starts from teacher layer i*stride")
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval_windows: int = Field(64, ge=0, description="val windows scored at the end; 0 skips")
    parallel: PostParallelConfig = Field(default_factory=PostParallelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _loop(self) -> DistillConfig:
        _adamw_loop(self.train, "kiln distill", ("cosine", "wsd"))
        return self


class RecoveryConfig(TrainConfig):
    """Pruning's recovery fine-tuning: train's fields, with defaults for a short run (none by default)."""

    steps: int = Field(0, ge=0, description="recovery fine-tuning steps; 0 = none")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


class PruneConfig(_Strict):
    sparsity: float = Field(0.5, ge=0, lt=1)
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    data: str | None = Field(None, description="prep output DIR: recovery fine-tuning and perplexity")
    train: RecoveryConfig = Field(default_factory=RecoveryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval_windows: int = Field(64, ge=0, description="val windows scored before/after; 0 skips")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _pattern_and_recovery(self) -> PruneConfig:
        _adamw_loop(self.train, "kiln prune's recovery", ("cosine",))
        if self.pattern == "2:4" and abs(self.sparsity - 0.5) > 1e-9:
            raise ValueError(f"sparsity: {self.sparsity} with pattern 2:4, which is exactly 0.5 by definition")
        if self.train.steps and not self.data:
            raise ValueError("data: train.steps > 0 (recovery fine-tuning) needs training data: "
                             "--set data=DIR (a `kiln prep` output)")
        return self


# --------------------------------------------------------------------------- eval / generate


class EvalConfig(_Strict):
    """What `kiln eval MODEL` reads; each flag sets the key of its name (--max-tokens: max_tokens)."""

    data: str | None = Field(None, description="prep output DIR: perplexity and bits/byte on its split")
    split: Literal["train", "val"] = "val"
    max_tokens: int | None = Field(None, ge=1, description="tokens scored on data; default: the whole split")
    tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks (a list, or a comma-separated string)")
    include_path: list[str] = Field(default_factory=list, description="more lm-eval task YAML dirs, read as data "
                                    "(no !function, no name Kiln or lm-eval defines)")
    trusted_include_path: list[str] = Field(default_factory=list, description="lm-eval task dirs you control: "
                                            "their !function hooks run")
    limit: float | None = Field(None, gt=0, description="documents per task (a fraction when below 1)")
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = Field(False, description="lm-eval renders each request in the model's chat format "
                                      "(a `kiln sft` model, or a transformers dir with a chat template)")
    batch_size: int = Field(8, ge=1)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value


class GenerateConfig(_Strict):
    """What `kiln generate MODEL` reads; each flag sets the key of its name (--top-p: top_p)."""

    prompt: str | None = Field(None, description="required, here or as --prompt")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0
    chat: bool = Field(False, description="the prompt is a user turn of the chat format; the reply ends at the end "
                       "of turn (a `kiln sft` model)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- sft


class SftDataConfig(_Strict):
    """Supervised fine-tuning data (pipeline/sft/data.py); the `data` section of `kiln sft`'s config."""

    paths: list[str] = Field(default_factory=list, description="SFT jsonl[.gz|.zst] / parquet files or dirs: "
                             '{"messages": [...]} or {"prompt", "completion"} records')
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="conversations held out, by a hash of their messages")
    truncation: Literal["drop", "truncate"] = Field("drop", description="a conversation longer than the context: "
                                                    "quarantined (drop), or cut to it if an assistant token is left")
    loss_on: Literal["completion_only", "all"] = Field("completion_only", description="tokens learned: the "
                                                       "assistant's content and <|end|>, or every token")
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)


class SftTrainConfig(TrainConfig):
    """Supervised fine-tuning's steps (pipeline/post/loop.py): train's fields, defaults for adapting a pretrained
    model (micro-batches are packed rows of model.block_size ids)."""

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


class SftLoraConfig(_Strict):
    """LoRA for `kiln sft` (pipeline/sft/lora.py, PEFT); rank 0 is full fine-tuning."""

    rank: int = Field(0, ge=0, description="0: full fine-tuning; > 0: LoRA adapters of this rank on the blocks' "
                      "linear layers, merged into the MODEL dir written at the end")
    alpha: float = Field(16.0, gt=0, description="the adapters' scale is alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=list, description="the linear layers adapted, by name (wq, wk, wv, "
                               "wo, w1, w2, w3, fc, proj); default: every linear layer of the blocks")
    train_embeddings: bool = Field(True, description="the embedding and head train too (the chat markers' rows "
                                   "start alike and must be learned)")


class SftConfig(_Strict):
    """What `kiln sft BASE --data FILE... --out DIR` reads."""

    data: SftDataConfig = Field(default_factory=SftDataConfig)
    train: SftTrainConfig = Field(default_factory=SftTrainConfig)
    lora: SftLoraConfig = Field(default_factory=SftLoraConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: PostParallelConfig = Field(default_factory=PostParallelConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _loop(self) -> SftConfig:
        _adamw_loop(self.train, "kiln sft", ("cosine", "wsd"))
        return self


SCHEMAS: dict[str, type[BaseModel]] = {
    "train": RunConfig,
    "prep": PrepConfig,
    "quantize": QuantizeConfig,
    "distill": DistillConfig,
    "prune": PruneConfig,
    "eval": EvalConfig,
    "generate": GenerateConfig,
    "sft": SftConfig,
}


# --------------------------------------------------------------------------- loading


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    """Apply `--set` items; return the new dict and {dotted key: origin} for error messages."""
    data = copy.deepcopy(data)
    origins: dict[str, str] = {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        origins[".".join(keys)] = f"--set {item}"
    return data, origins


def _known_keys(schema: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys the section holding `loc`'s last key accepts (none when it is not a schema's)."""
    for part in loc[:-1]:
        field = schema.model_fields.get(str(part)) if schema else None
        schema = field.annotation if field else None
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            return []
    return list(schema.model_fields) if schema else []


def _describe(err: dict, schema: type[BaseModel] | None = None) -> str:
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if err["type"] == "literal_error":
        expected = ctx.get("expected", "").replace(" or ", ", ").replace("'", "").replace(", ", ",")
        return f"{value!r} is not one of {expected}"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(schema, err["loc"]), n=1, cutoff=0.8)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if err["type"] == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["loc"] and value is not None and not isinstance(value, dict):
        return f"{value!r}: {msg}"
    return msg


def format_validation_error(exc: ValidationError, source: str, origins: dict[str, str] | None = None,
                            schema: type[BaseModel] | None = None) -> str:
    """One line per problem: `<file or --set>: <dotted.key>: <what is wrong>` (an unknown key of `schema`
    with its likeliest intended name)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if not key:  # a cross-field rule: its message starts with the key it blames
            msg = _describe(err)
            blamed = msg.split(":", 1)[0]
            lines.append(f"{(origins or {}).get(blamed, source)}: {msg}")
            continue
        origins = origins or {}  # an unknown section (`--set train.lr=1` on eval) is blamed on the --set under it
        where = origins.get(key) or next((o for k, o in origins.items() if k.startswith(key + ".")), source)
        lines.append(f"{where}: {key}: {_describe(err, schema)}")
    return "\n".join(lines)


def build(schema: type[BaseModel], data: dict, source: str = "<config>", origins: dict | None = None):
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, origins, schema)) from None


def load_config(kind: str, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, flags: dict[str, str] | None = None):
    """Load a config of `kind` ("train", "prep", ...) from YAML + `--set` overrides.

    `base` holds values from CLI flags; the file wins over flags' defaults only
    where the flag was not given (the CLI passes only flags the user set).
    `flags` ({key: "--flag"}) names the flag behind a `base` key in errors.
    """
    schema = SCHEMAS[kind]
    data = load_yaml(path) if path else {}
    if base:
        data = _deep_merge(data, base)
    data, origins = apply_overrides(data, overrides or [])
    return build(schema, data, str(path) if path else "<defaults>", {**(flags or {}), **origins})


def flatten(data: dict | BaseModel, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; used for MLflow params and config digests."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _type_name(ann) -> str:
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """The configuration reference in docs/configuration.md, generated from the schemas (tests/test_readme.py keeps
    them in sync)."""
    lines = []

    def walk(schema: type[BaseModel], prefix: str) -> None:
        for name, field in schema.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            kind = _type_name(ann)
            lines.append(f"| `{prefix}{name}` | {kind} | `{default}` | {field.description or ''} |")

    for kind, schema in SCHEMAS.items():
        lines.append(f"\n**{kind}** (`{schema.__name__}`)\n\n| key | type | default | notes |\n|---|---|---|---|")
        walk(schema, "")
    return "\n".join(lines).strip() + "\n"
