"""Expert parallelism: a mixture of experts' experts spread over data-parallel ranks, on DeepSpeed's MoE layer.

With parallel.ep > 1, `parallelize` swaps each plain `layers.MoE` for an `ExpertParallelMoE` holding DeepSpeed's
`deepspeed.moe.layer.MoE`: EP rank r keeps the plain model's experts r * n/ep .. (r+1) * n/ep - 1 and sends each
token to the rank holding its experts (all-to-all over the EP group; gloo runs it on CPU). It is set to compute
the plain layer's function: top-2 with the gates renormalized, no capacity (no token dropped), no random second
expert; the load-balancing loss is Kiln's own, from the same router logits. DeepSpeed's engine reduces the
experts' gradients over their expert-data-parallel group (param groups split by `deepspeed.moe.utils`,
optimizer.param_groups), averaged over all DP ranks (engine.ds_config), and ZeRO 1/2 partition them there.

Parameters keep their plain names for materialize and checkpoints: `plain_names` maps the plain model's names
(router.weight, experts.<global e>.w1.weight, ...) to where they live now; an expert held by another rank has
no entry (materialize draws its seeded values and drops them, its slice is written by its own rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.layers import MoE, balance_loss, route


class ExpertParallelMoE(nn.Module):
    renamed = ("router.", "experts.")  # plain names found through `plain_names`

    def __init__(self, plain: MoE, ep: int):
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
        from deepspeed.utils import groups

        super().__init__()
        n, self.k = len(plain.experts), plain.k
        local = n // ep
        with torch.device("meta" if plain.router.weight.is_meta else plain.router.weight.device):
            self.ds = DeepSpeedMoE(plain.router.in_features, plain.experts[0], num_experts=n, ep_size=ep, k=plain.k,
                                   drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        if self.ds.expert_group_name not in groups._get_expert_parallel_group_dict():  # made once, by name;
            groups._create_expert_and_data_parallel(ep)  # DeepSpeed's engine hands them to the layer
        ep_rank = groups._get_expert_parallel_rank(self.ds.expert_group_name)
        self.shared = plain.shared
        self.aux_loss: torch.Tensor | None = None
        experts = self.ds.deepspeed_moe.experts.deepspeed_experts
        self.plain_names = {"router.weight": "ds.deepspeed_moe.gate.wg.weight"}
        for j, expert in enumerate(experts):
            for name, _ in expert.named_parameters():
                self.plain_names[f"experts.{ep_rank * local + j}.{name}"] = \
                    f"ds.deepspeed_moe.experts.deepspeed_experts.{j}.{name}"
        self.ds.deepspeed_moe.gate.register_forward_pre_hook(self._balance)

    def _balance(self, gate, args) -> None:
        """The balancing loss from the gate's input: its router logits, as DeepSpeed's gate computes them (fp32)."""
        flat = args[0].reshape(-1, args[0].size(-1)).float()
        probs, _, experts = route(F.linear(flat, gate.wg.weight.float()), self.k)
        self.aux_loss = balance_loss(probs, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.ds(x)  # DeepSpeed's own l_aux (Switch's top-1 form) is not used
        return out if self.shared is None else out + self.shared(x)


def parallelize_ep(module: nn.Module, ep: int) -> nn.Module:
    """Swap every plain MoE under `module` for its expert-parallel form, in place (meta device or not)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, ExpertParallelMoE(child, ep))
    return module
