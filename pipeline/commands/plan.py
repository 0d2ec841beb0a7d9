"""`kiln plan`: the compute-optimal model and tokens for a budget (Chinchilla) and per-GPU memory of a layout."""

from __future__ import annotations

from typing import get_args

from pipeline.commands.common import add_common_options
from pipeline.config import TrainConfig

NAME = "plan"
HELP = "Compute-optimal model/tokens for a budget (Chinchilla) and per-GPU memory of a layout."
EXAMPLE = "kiln plan --gpus 64 --hours 720 --gpu h100 --tp 2 --zero-stage 1 --micro-batch-size 4"


def add_arguments(p) -> None:
    add_common_options(p, config=False)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--flops", type=float, help="total training FLOPs")
    budget.add_argument("--gpus", type=int, help="GPU count (with --hours)")
    p.add_argument("--hours", type=float)
    p.add_argument("--gpu", default="h100", help="h100, h200, b200, a100, l40s, a10g, v100, or cpu (this machine: "
                   "its fp32 matmul peak measured, its RAM as the memory; --gpus counts such machines)")
    p.add_argument("--data", metavar="DIR", help="a kiln prep output: the model gets its tokenizer's vocabulary "
                   "(default 50,304), as kiln train gives it")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization")
    p.add_argument("--tokens-per-param", type=float, default=20.0)
    p.add_argument("--model", help="a configs/model name or YAML file for the memory estimate (default: nearest)")
    layout = p.add_argument_group("layout to check (none given: kiln plan recommends one, as the shipped configs do)")
    layout.add_argument("--tp", type=int, help="default 1")
    layout.add_argument("--pp", type=int, help="default 1")
    layout.add_argument("--dp", type=int, help="default: gpus / (tp*pp)")
    layout.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="default 1")
    layout.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default bf16")
    layout.add_argument("--micro-batch-size", type=int, help="default 1")
    layout.add_argument("--grad-accum", type=int, help="micro-batches per step; default: counted as several (in bf16 "
                        "their fp32 sum takes 4 bytes a parameter, which --grad-accum 1 without a pipeline does not need)")
    layout.add_argument("--seq-len", type=int)
    layout.add_argument("--activation-checkpointing", nargs="?", const="full", default=None,
                        choices=get_args(TrainConfig.model_fields["activation_checkpointing"].annotation),
                        help="alone: full")
    layout.add_argument("--sequence-parallel", action="store_true", help="with --tp > 1: norms and residuals split "
                        "over the sequence (parallel.sequence_parallel)")


def run(args) -> dict:
    from pipeline.console import kv_table
    from pipeline.plan import human_count, make_plan

    given = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "zero_stage": args.zero_stage, "precision": args.precision,
             "micro_batch_size": args.micro_batch_size, "grad_accum": args.grad_accum, "seq_len": args.seq_len,
             "activation_checkpointing": args.activation_checkpointing,
             "sequence_parallel": args.sequence_parallel or None}
    layout = None  # none given: make_plan recommends one
    if any(v is not None for v in given.values()):
        layout = {"tp": 1, "pp": 1, "zero_stage": 1, "precision": "bf16", "micro_batch_size": 1,
                  "activation_checkpointing": "none"}
        layout.update({k: v for k, v in given.items() if v is not None})
    plan = make_plan(
        flops=args.flops, gpus=args.gpus, hours=args.hours, gpu=args.gpu, mfu=args.mfu,
        tokens_per_param=args.tokens_per_param, model=args.model, layout=layout, data=args.data,
    )
    unit = f"1 x {plan['gpu']}"
    shown = {
        "compute budget": f"{plan['flops']:.3e} FLOPs",
        "compute-optimal params (Chinchilla)": human_count(plan["optimal_params"]),
        "compute-optimal tokens": human_count(plan["optimal_tokens"]),
        "nearest shipped config": f"configs/model/{plan['model_config']}.yaml ({human_count(plan['model_params'])} params"
                                  + (f", {human_count(plan['model_active_params'])} active)"
                                     if plan["model_active_params"] != plan["model_params"] else ")"),
        "tokens that config gets from the budget": human_count(plan["tokens_for_model"]),
        "vocabulary": f"{plan['vocab_size']:,} ({plan['vocab_from']})",
        f"peak of {unit}": (f"{plan['peak_flops'] / 1e9:,.1f} GFLOP/s" if plan["peak_flops"] < 1e12
                            else f"{plan['peak_flops'] / 1e12:,.0f} TFLOP/s") + f" ({plan['peak_from']})",
        f"the budget's time on {unit}": f"{plan['hours_on_one']:,.3g} h at MFU {args.mfu:g}",
        "recommended layout" if plan["layout_recommended"] else "layout":
            ", ".join(f"{k}={v}" for k, v in plan["layout"].items() if v is not None),
    }
    if "fits" in plan:
        shown["GPUs needed"] = f"{plan['fits']['gpus_needed']} x {plan['fits']['gpu']} ({plan['fits']['note']})"
    if "tokens_per_s_needed" in plan:
        shown["cluster tokens/s needed"] = f"{plan['tokens_per_s_needed']:,.0f}"
    shown.update({f"memory/GPU: {k}": f"{v:,.2f} GiB" for k, v in plan["memory_gib"].items()})
    kv_table("kiln plan", shown)
    return plan

