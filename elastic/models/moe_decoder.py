"""One decoder for every supported MoE family; `ModelArch` switches the few places they differ."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from elastic.config import ParallelConfig
from elastic.config.model_arch import ModelArch
from elastic.layers.attention import Attention
from elastic.layers.linear import Linear, MergedLinear, default_weight_loader
from elastic.layers.moe import FusedMoE
from elastic.layers.norm import RMSNorm
from elastic.layers.rotary import RotaryEmbedding
from elastic.layers.unreduced import UnreducedRows


class SelfAttention(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.qkv_proj = MergedLinear(arch.hidden_size, [arch.q_size, arch.kv_size, arch.kv_size], bias=arch.qkv_bias)
        self.o_proj = Linear(arch.q_size, arch.hidden_size)
        if arch.qk_norm == "per_head":
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        elif arch.qk_norm == "full":
            self.q_norm = RMSNorm(arch.q_size, arch.rms_norm_eps)
            self.k_norm = RMSNorm(arch.kv_size, arch.rms_norm_eps)
        self.rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta)
        self.attn = Attention(arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x [T, hidden] -> [T, hidden]
        arch = self.arch
        q, k, v = self.qkv_proj(x).split([arch.q_size, arch.kv_size, arch.kv_size], dim=-1)
        if arch.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if arch.clip_qkv is not None:
            q, k, v = (t.clamp(-arch.clip_qkv, arch.clip_qkv) for t in (q, k, v))
        q = q.view(-1, arch.num_heads, arch.head_dim)  # [T, Hq, D]
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)  # [T, Hkv, D]
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        # Rotated (after Qwen3's per-head RMSNorm) where k is written into the cache: one kernel on CUDA.
        norms = (self.q_norm, self.k_norm) if arch.qk_norm == "per_head" else None
        return self.o_proj(self.attn(q, k, v, positions, self.rotary, norms).flatten(1))


class DenseMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    def __init__(self, arch: ModelArch, parallel: ParallelConfig) -> None:
        super().__init__()
        self.gate = Linear(arch.hidden_size, arch.num_experts)  # the router
        self.experts = FusedMoE(arch.num_experts, arch.top_k, arch.hidden_size, arch.moe_intermediate_size,
                                renormalize=arch.norm_topk_prob, ep_size=parallel.data_parallel_size,
                                ep_rank=parallel.data_parallel_rank,
                                num_redundant=parallel.num_redundant_experts)
        self.shared_expert: DenseMLP | None = None
        if arch.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(arch.hidden_size, arch.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(arch.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | UnreducedRows:
        # The next RMSNorm may sum an exchange's per-rank blocks itself, unless a shared expert is added first.
        out = self.experts(x, self.gate(x), unreduced_ok=self.shared_expert is None)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, parallel: ParallelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = self.make_attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp: nn.Module = (self.make_moe(arch, parallel) if arch.sparse_layers[layer_idx]
                               else DenseMLP(arch.hidden_size, arch.intermediate_size))

    # Families with another attention or MoE block (DeepSeek) subclass these two.
    def make_attention(self, arch: ModelArch) -> nn.Module:
        return SelfAttention(arch)

    def make_moe(self, arch: ModelArch, parallel: ParallelConfig) -> nn.Module:
        return SparseMoeBlock(arch, parallel)

    def forward(self, positions: torch.Tensor, x: torch.Tensor | UnreducedRows,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor | UnreducedRows, torch.Tensor]:
        """Pre-norm block in the fused-residual style: x [T, hidden] is the previous block's output
        not yet added to `residual` (None for the first layer, whose x is the embedding).
        Returns (this block's MLP output, residual stream before it); the caller's next norm adds
        them (and sums an expert-parallel output's per-rank blocks: UnreducedRows). Same math as
        h = r + attn(norm(r));  out = h + mlp(norm(h)),  with each add fused into
        the norm that follows it (one kernel on CUDA)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h), residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, parallel: ParallelConfig,
                 layer_class: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.weight_loader = default_weight_loader
        self.layers = nn.ModuleList(layer_class(arch, i, parallel) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                layers: Sequence[int] | None = None) -> torch.Tensor:
        """`layers`: run only these (a warm-up that compiles every kernel the whole model launches)."""
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for layer in self.layers if layers is None else [self.layers[i] for i in layers]:
            x, residual = layer(positions, x, residual)
        if residual is None:
            return self.norm(x)
        return self.norm(x, residual)[0]


class MoeForCausalLM(nn.Module):
    """Written as single-device code; expert parallelism only changes which expert slots a rank holds
    (`parallel`) and how FusedMoE reaches the others (`elastic.distributed.expert_parallel`)."""

    layer_class: type[DecoderLayer] = DecoderLayer

    def __init__(self, arch: ModelArch, parallel: ParallelConfig = ParallelConfig()) -> None:
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, parallel, self.layer_class)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                layers: Sequence[int] | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, layers)  # hidden states [T, hidden]

    def warm_up_layers(self) -> list[int]:
        """One layer of each kind: the first (no residual yet), then the first of every (attention, MLP)
        type after it. A forward over these launches every kernel shape the whole model does, at a fraction
        of the cost (CUDA-graph warm-ups: one per batch size, and again for every new layout)."""
        chosen, seen = [0], set()
        for i, layer in enumerate(self.model.layers[1:], start=1):
            kind = (type(layer.self_attn), type(layer.mlp))
            if kind not in seen:
                seen.add(kind)
                chosen.append(i)
        return chosen

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, vocab]

    def moe_layers(self) -> list[FusedMoE]:
        return [m for m in self.modules() if isinstance(m, FusedMoE)]
