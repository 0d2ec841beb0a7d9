"""`kiln plan`: how big a model a compute budget buys, and whether a layout fits in memory.

Compute-optimal sizing follows Chinchilla (Hoffmann et al. 2022): C ~= 6*N*D with
D ~= 20*N tokens. Memory follows the ZeRO paper's accounting (Rajbhandari et al.
2020: 2+2+12 bytes/param under mixed precision) and, for activations, Korthikanti
et al. 2022 (34*s*b*h bytes per layer with fused attention, /tp with sequence
parallelism; 2*s*b*h with full recomputation).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.config import ConfigError, ModelConfig, load_yaml
from pipeline.model.flops import param_counts

# Dense bf16 tensor-core peaks from vendor spec sheets (FLOP/s per GPU; V100: fp16, it has no bf16).
# The one table: `kiln plan` budgets with it and training's MFU divides by it (gpu_peak_flops).
GPU_PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "l40s": 362e12,
    "a10g": 125e12,
    "v100": 125e12,
}
# Memory per GPU (GiB) of the common SXM/PCIe parts, for `kiln plan`'s recommended layout.
GPU_MEMORY_GIB = {"h100": 80, "h200": 141, "b200": 180, "a100": 80, "l40s": 48, "a10g": 24, "v100": 32}
# The share of a GPU's memory the estimate below may fill: the rest is the allocator's fragmentation, NCCL and
# ZeRO's communication buckets, cuBLAS/compile workspaces, and the estimate's own error. At 0.75, 1.3b with a
# micro-batch of 8 fits one 80 GB GPU (estimate 56 GiB), as nanoGPT's 1.3b measurement on one H100 shows.
MEMORY_BUDGET = 0.75
DEFAULT_VOCAB = 50304
GIB = 2**30
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"


def human_count(n: float) -> str:
    """A parameter or token count at a readable scale: 912,871 / 18.3 M / 1.25 B / 1.40 T."""
    for div, unit, digits in ((1e12, "T", 2), (1e9, "B", 2), (1e6, "M", 1)):
        if n >= div:
            return f"{n / div:,.{digits}f} {unit}"
    return f"{n:,.0f}"


CPU = "cpu"  # `--gpu cpu`: this machine, its peak measured (there is no spec sheet to read)


def known_devices() -> str:
    return ", ".join([*sorted(GPU_PEAK_FLOPS), CPU])


def peak_of(gpu: str) -> tuple[float, str]:
    """(FLOP/s of one device, where that number comes from). A GPU: its bf16 spec. The CPU: an fp32 matmul
    measured here, on the threads a Kiln process would use, an estimate for this machine only."""
    if gpu == CPU:
        from pipeline.device import measured_peak_flops, use_cpu_threads

        threads = use_cpu_threads()
        peak = measured_peak_flops()
        return peak, f"CPU estimate: fp32 matmul measured on this machine, {threads} thread(s)"
    if gpu not in GPU_PEAK_FLOPS:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; known: {known_devices()}")
    return GPU_PEAK_FLOPS[gpu], f"{gpu} bf16 dense spec"


def device_memory_gib(gpu: str) -> float:
    """Memory of one device: a GPU's from the table; the CPU's is this machine's RAM."""
    if gpu == CPU:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if gpu not in GPU_MEMORY_GIB:
        raise ConfigError(f"--gpu {gpu}: unknown GPU; known: {known_devices()}")
    return GPU_MEMORY_GIB[gpu]


def gpu_peak_flops(device_name: str) -> float | None:
    """The spec peak of a GPU from its device name (e.g. "NVIDIA H100 80GB HBM3"), or None if unknown."""
    name = device_name.lower()
    return next((peak for gpu, peak in GPU_PEAK_FLOPS.items() if gpu in name), None)


def budget_flops(gpus: int, hours: float, gpu: str = "h100", mfu: float = 0.4) -> float:
    """Training FLOPs a cluster delivers: GPUs x seconds x peak x achieved MFU."""
    if gpus <= 0 or hours <= 0 or not 0 < mfu <= 1:
        raise ConfigError("--gpus and --hours must be positive and --mfu in (0, 1]")
    return gpus * hours * 3600.0 * peak_of(gpu)[0] * mfu


def compute_optimal(flops: float, tokens_per_param: float = 20.0) -> dict[str, float]:
    """Chinchilla: with C = 6*N*D and D = r*N, N = sqrt(C / (6r))."""
    if flops <= 0:
        raise ConfigError(f"--flops {flops}: must be positive")
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return {"flops": flops, "params": n, "tokens": tokens_per_param * n}


def shipped_models(config_dir: Path = CONFIG_DIR, vocab_size: int = DEFAULT_VOCAB) -> dict[str, ModelConfig]:
    """The GPT-3 table sizes and, for budgets a CPU spends, the demo model (not the test shapes)."""
    out = {}
    for path in [config_dir / "demo.yaml", *sorted(config_dir.glob("[0-9]*.yaml"))]:
        data = load_yaml(path).get("model", {})
        data.setdefault("vocab_size", vocab_size)
        out[path.stem] = ModelConfig.model_validate(data)
    return out


def nearest_model(params: float, vocab_size: int = DEFAULT_VOCAB) -> tuple[str, ModelConfig, int]:
    """The shipped config whose parameter count is nearest in log space."""
    models = shipped_models(vocab_size=vocab_size)
    name = min(models, key=lambda k: abs(math.log(param_counts(models[k])["total"] / params)))
    return name, models[name], param_counts(models[name])["total"]


def memory_per_gpu(
    cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    zero_stage: int = 1,
    precision: str = "bf16",
    micro_batch_size: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: str = "none",
    sequence_parallel: bool = False,
    offload: str = "none",
    micro_batches: int | None = None,
    loss_chunk: int = 4096,
    grad_accum: int | None = None,
) -> dict[str, float]:
    """Bytes per GPU, broken down; the first pipeline stage (the fullest one) is reported.
    `activation_checkpointing`: none / selective / full. Selective is counted like none, an upper bound (it
    keeps what costs compute to redo, and drops element-wise outputs).
    Activations per layer (Korthikanti et al. 2022, 16-bit, flash attention): s·b·h·(10 + 24/tp) under
    tensor parallelism, where norms, residuals and dropout stay whole on every rank; with
    `sequence_parallel`, which splits those over the sequence too, 34/tp plus the two gathered sub-block
    inputs autograd keeps whole for backward (2·s·b·h each; tp of them would be 34/tp): 34/tp + 4(1 - 1/tp)."""
    if sequence_parallel and tp == 1:
        raise ConfigError("sequence parallelism needs tensor parallelism: give --tp > 1")
    full_recompute = activation_checkpointing == "full"
    vocab = cfg.vocab_size or DEFAULT_VOCAB
    psi = param_counts(cfg, vocab)["total"] / (tp * pp)
    mixed = precision in ("bf16", "fp16")
    # bf16: the fp32 sum of the gradients over micro-batches (engine.ds_config's grad_accum_dtype; each bf16 gradient
    # is added and freed as backward makes it, as in Megatron), or with one micro-batch a step (`grad_accum` 1;
    # None: not known, counted) and no pipeline, just the bf16 gradients
    g_bytes = {"bf16": 2 if grad_accum == 1 and pp == 1 else 4, "fp16": 2}.get(precision, 4)
    w_bytes, o_bytes = (2, 12) if mixed else (4, 8)
    weights, grads, optim = psi * w_bytes, psi * g_bytes, psi * o_bytes
    if zero_stage >= 1:
        optim /= dp
    if zero_stage >= 2:
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    if offload == "cpu":
        optim = 0.0

    s, b, h = seq_len or cfg.block_size, micro_batch_size, cfg.n_embd
    act_scale = 1 if mixed else 2
    layers_here = cfg.n_layer // pp
    in_flight = min(pp, micro_batches or pp)  # 1F1B: stage 0 holds pp micro-batches
    per_sbh = 34 / tp + 4 * (1 - 1 / tp) if sequence_parallel else 10 + 24 / tp
    one_layer = s * b * h * act_scale * per_sbh
    if full_recompute:  # each layer keeps its input; one layer's activations exist at a time, in backward
        per_layer, recompute = 2 * s * b * h * act_scale / (tp if sequence_parallel else 1), one_layer
    else:
        per_layer, recompute = one_layer, 0.0
    activations = per_layer * layers_here * in_flight + recompute
    # fp32 logits and their gradient: the chunked loss (train.loss_chunk) holds one chunk's; under PP the last stage's
    # loss takes the full logits
    tokens = s * b if pp > 1 or not loss_chunk else min(loss_chunk, s * b)
    logits = 4.0 * tokens * vocab / tp * 2
    total = weights + grads + optim + activations + logits
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": optim,
        "activations": activations,
        "logits": logits,
        "total": total,
    }


def memory_budget(gpu: str) -> float:
    """Bytes of one GPU's memory a layout may fill (MEMORY_BUDGET of it); an unknown GPU is a config error."""
    return MEMORY_BUDGET * device_memory_gib(gpu) * GIB


def recommend_layout(cfg: ModelConfig, gpus: int, gpu: str = "h100", precision: str = "bf16") -> dict:
    """The layout an expert starts from: ZeRO-1 data parallelism with a micro-batch of 16, 8 or 4. Recomputing
    activations costs a third more compute, a TP=2..8 group inside an NVLink node much less: so every tensor-parallel
    size is tried without activation checkpointing before any with it; from TP=4 on, with sequence parallelism (the
    activations TP leaves whole on every rank would otherwise dominate). Pipeline stages (2, 4, ... dividing the
    layers) only where no single-stage layout fits: they cost a pipeline bubble. Fits = under MEMORY_BUDGET."""
    budget = memory_budget(gpu)
    for pp in (p for p in (1, 2, 4, 8, 16) if cfg.n_layer % p == 0 and gpus % p == 0):
        sizes = [t for t in (1, 2, 4, 8) if cfg.n_head % t == 0 and cfg.kv_heads % t == 0 and gpus % (t * pp) == 0]
        for ckpt in ("none", "full"):
            for tp in sizes:
                for mbs in (16, 8, 4) if ckpt == "none" else (8, 4, 2, 1):
                    layout = {"tp": tp, "pp": pp, "dp": gpus // (tp * pp), "zero_stage": 1, "precision": precision,
                              "micro_batch_size": mbs, "activation_checkpointing": ckpt, "sequence_parallel": tp >= 4}
                    if memory_per_gpu(cfg, **layout)["total"] <= budget:
                        return layout
    raise ConfigError(f"no ZeRO-1 layout with tp <= 8 and pp <= 16 fits {cfg.n_layer} layers x {cfg.n_embd} on "
                      f"{gpus} x {gpu}; try ZeRO-3 (give --tp/--pp/--zero-stage to check one)")


def smallest_fit(cfg: ModelConfig, gpu: str = "h100", precision: str = "bf16", most: int = 16384) -> tuple[int, dict] | None:
    """(GPUs, layout) of the smallest power-of-two GPU count with a recommended layout that fits; None up to `most`."""
    gpus = 1
    while gpus <= most:
        try:
            return gpus, recommend_layout(cfg, gpus, gpu, precision)
        except ConfigError:
            gpus *= 2
    return None


def make_plan(
    *,
    flops: float | None = None,
    gpus: int | None = None,
    hours: float | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    tokens_per_param: float = 20.0,
    model: str | None = None,
    layout: dict | None = None,
    data: str | Path | None = None,
) -> dict:
    """Everything `kiln plan` prints, as one dict. `data`: a `kiln prep` output, whose tokenizer's vocabulary
    the model gets (as `kiln train` gives it), so the parameter counts are those of the model to be trained."""
    vocab, vocab_from = DEFAULT_VOCAB, "the default; --data DIR gives your tokenizer's"
    if data is not None:
        from pipeline.data.corpus import PreparedCorpus

        vocab, vocab_from = PreparedCorpus(data, verify=False).vocab_size, f"{data}'s tokenizer"
    memory_budget(gpu)  # an unknown GPU is refused as such, before anything is measured or searched
    peak, peak_note = peak_of(gpu)
    if flops is None:
        if gpus is None or hours is None:
            raise ConfigError("kiln plan: give --flops, or --gpus and --hours")
        flops = budget_flops(gpus, hours, gpu, mfu)
    optimum = compute_optimal(flops, tokens_per_param)
    name, cfg, n = nearest_model(optimum["params"], vocab)
    if model:
        path = Path(model)
        if not path.exists():
            path = CONFIG_DIR / f"{model}.yaml"
        spec = load_yaml(path).get("model", {})
        if spec.get("vocab_size"):
            vocab, vocab_from = spec["vocab_size"], f"{path}'s model.vocab_size"
        spec["vocab_size"] = vocab
        name, cfg = path.stem, ModelConfig.model_validate(spec)
        n = param_counts(cfg)["total"]
    active = param_counts(cfg)["active"]
    recommended, fits = layout is None, None
    precision = "fp32" if gpu == CPU else "bf16"  # Kiln trains fp32 on CPUs (configs/train/*-cpu.yaml)
    if recommended:  # a memory failure is an answer, not an exit: say how many GPUs it takes instead
        try:
            layout = recommend_layout(cfg, gpus or 1, gpu, precision)
        except ConfigError as e:
            fits = smallest_fit(cfg, gpu, precision)
            if fits is None:
                raise ConfigError(f"{e}; no layout fits up to 16384 x {gpu} either") from None
            layout = fits[1]
    layout = dict(layout)
    layout.setdefault("dp", max(1, (gpus or 1) // (layout.get("tp", 1) * layout.get("pp", 1))))
    mem = memory_per_gpu(cfg, **layout)
    plan = {
        "flops": flops,
        "optimal_params": optimum["params"],
        "optimal_tokens": optimum["tokens"],
        "tokens_per_param": tokens_per_param,
        "model_config": name,
        "model_params": n,
        "model_active_params": active,  # what a token runs through (a mixture of experts: its routed experts)
        "tokens_for_model": flops / (6.0 * active),
        "layout": layout,
        "layout_recommended": recommended,
        "memory_gib": {k: v / GIB for k, v in mem.items()},
        "vocab_size": vocab,
        "vocab_from": vocab_from,
        "gpu": gpu,
        "peak_flops": peak,
        "peak_from": peak_note,
        "hours_on_one": flops / (peak * mfu) / 3600.0,  # the budget's time on one device at --mfu
    }
    if fits:
        plan["fits"] = {"gpus_given": gpus or 1, "gpus_needed": fits[0], "gpu": gpu,
                        "note": f"{name} does not fit {gpus or 1} x {gpu} with ZeRO-1, tp <= 8, pp <= 16; "
                                f"the layout shown is for {fits[0]} x {gpu}"}
    if gpus and hours:
        plan.update(gpus=gpus, hours=hours, gpu=gpu, mfu=mfu)
        plan["tokens_per_s_needed"] = optimum["tokens"] / (hours * 3600.0)
    return plan
