"""DeepSeek-V2 / V3: latent attention (elastic.layers.mla), grouped top-k routing into the same FusedMoE as the
other families (physical slots, expert parallelism and EPLB unchanged), always-on shared experts, and dense
MLPs in the first `first_k_dense_replace` layers. The decoder skeleton is moe_decoder's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elastic.config import ParallelConfig
from elastic.config.model_arch import ModelArch
from elastic.kernels.routing import grouped_topk
from elastic.layers.linear import default_weight_loader
from elastic.layers.mla import MlaAttention
from elastic.layers.moe import FusedMoE, TopkRouter
from elastic.layers.unreduced import UnreducedRows
from elastic.models.moe_decoder import DecoderLayer, DenseMLP, MoeForCausalLM


class ExpertGate(nn.Module):
    """The router, kept in fp32 as the reference does (logits of bf16 activations are computed in fp32); V3
    adds e_score_correction_bias, which steers the choice but not the weights."""

    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(arch.num_experts, arch.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.e_score_correction_bias: nn.Parameter | None = None
        if arch.scoring_func == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.empty(arch.num_experts, dtype=torch.float32),
                                                        requires_grad=False)
            self.e_score_correction_bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight)  # [T, E] fp32


def expert_choice(arch: ModelArch, gate: ExpertGate) -> TopkRouter | None:
    """The FusedMoE router of one layer: router logits -> (weights, logical ids); None where the choice is
    FusedMoE's own softmax top-k (V2 greedy without scaling, e.g. DeepSeek-V2-Lite: one fused kernel on CUDA).
    V2 renormalises *instead of* scaling when norm_topk_prob is set (DeepSeek's own V2 code; every released V2
    config has it off, where transformers agrees); V3 renormalises and then scales."""
    v2_renorm = arch.scoring_func == "softmax" and arch.norm_topk_prob
    scaling = 1.0 if v2_renorm else arch.routed_scaling_factor
    if arch.scoring_func == "softmax" and arch.num_expert_groups == 1 and scaling == 1.0:
        return None

    def choose(router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_topk(router_logits, arch.top_k, arch.norm_topk_prob, arch.scoring_func,
                            gate.e_score_correction_bias, arch.num_expert_groups, arch.topk_groups,
                            arch.group_score, scaling)

    return choose


class DeepseekMoE(nn.Module):
    def __init__(self, arch: ModelArch, parallel: ParallelConfig) -> None:
        super().__init__()
        self.gate = ExpertGate(arch)
        self.experts = FusedMoE(arch.num_experts, arch.top_k, arch.hidden_size, arch.moe_intermediate_size,
                                renormalize=arch.norm_topk_prob, ep_size=parallel.data_parallel_size,
                                ep_rank=parallel.data_parallel_rank, num_redundant=parallel.num_redundant_experts,
                                router=expert_choice(arch, self.gate))
        self.shared_experts: DenseMLP | None = None
        if arch.shared_expert_intermediate_size:
            self.shared_experts = DenseMLP(arch.hidden_size, arch.shared_expert_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor | UnreducedRows:
        out = self.experts(x, self.gate(x), unreduced_ok=self.shared_experts is None)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekDecoderLayer(DecoderLayer):
    def make_attention(self, arch: ModelArch) -> nn.Module:
        return MlaAttention(arch)

    def make_moe(self, arch: ModelArch, parallel: ParallelConfig) -> nn.Module:
        return DeepseekMoE(arch, parallel)


class DeepseekForCausalLM(MoeForCausalLM):
    layer_class = DeepseekDecoderLayer

    def __init__(self, arch: ModelArch, parallel: ParallelConfig = ParallelConfig()) -> None:
        super().__init__(arch, parallel)
        # One cos/sin table for every layer: at DeepSeek's context lengths (163840 positions for V2-Lite)
        # a table per layer would hold over a GiB.
        layers = [layer.self_attn for layer in self.model.layers]
        for attn in layers[1:]:
            attn.rotary = layers[0].rotary
