"""DeepSeek-V2/V3 (MLA with a latent cache, grouped top-k routing) against transformers' own models (fp32, CPU),
on tiny random checkpoints with unusual shapes (see tests/checkpoints.py: q-LoRA off and on, odd latent and
head dims, YaRN with mscale, first_k_dense_replace, groups, shared experts, a score-correction bias)."""
from __future__ import annotations

import json

import pytest
import torch
from checkpoints import DEEPSEEK_FAMILIES, hf_greedy, hf_logits
from conftest import random_prompts

from elastic import LLM, SamplingParams
from elastic.config.model_arch import load_arch

MAX_NEW = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
PROMPTS = random_prompts((3, 11, 29, 45), seed=11)
LLM_ARGS = dict(device="cpu", dtype="float32", max_model_len=128)


@pytest.fixture(scope="module", params=DEEPSEEK_FAMILIES)
def case(request, checkpoint_dir):
    """(family, checkpoint path, transformers' greedy continuations of PROMPTS)."""
    path = checkpoint_dir(request.param)
    return request.param, path, hf_greedy(path, PROMPTS, MAX_NEW)


def _generate(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_arch_parses_every_field_that_changes_the_math(checkpoint_dir):
    v2, v3 = load_arch(checkpoint_dir("deepseek_v2")), load_arch(checkpoint_dir("deepseek_v3"))
    assert v2.mla.q_lora_rank is None and v3.mla.q_lora_rank == 40
    assert (v2.mla.kv_lora_rank, v2.mla.qk_nope_head_dim, v2.mla.qk_rope_head_dim, v2.mla.v_head_dim) == (24, 12, 8, 20)
    assert v2.rope_scaling.factor == 4.0 and v2.rope_scaling.mscale_all_dim == 1.0 and v3.rope_scaling is None
    assert (v2.scoring_func, v2.group_score, v2.num_expert_groups, v2.topk_groups) == ("softmax", "max", 4, 2)
    assert (v3.scoring_func, v3.group_score, v3.routed_scaling_factor, v3.norm_topk_prob) == ("sigmoid", "top2_sum",
                                                                                            2.5, True)
    assert v2.sparse_layers == v3.sparse_layers == (False, True, True)
    assert v3.shared_expert_intermediate_size == 2 * 16


@pytest.mark.parametrize("change, error", [
    (dict(quantization_config={"quant_method": "fp8"}), "quantized"),
    (dict(n_group=3), "n_group=3 must divide"),
    (dict(topk_method="noaux_tc"), "topk_method"),
])
def test_bad_configs_are_refused_clearly(checkpoint_dir, tmp_path, change, error):
    cfg = json.loads((checkpoint_dir("deepseek_v2") / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=error):
        load_arch(tmp_path)


def test_matches_transformers(case):
    """Logits of a prompt, prompt logprobs and greedy tokens; the cache holds one latent row per token."""
    family, path, expected = case
    llm = LLM(str(path), **LLM_ARGS)
    arch = llm.config.model.arch
    runner = llm.engine.runner
    row = arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim
    assert runner.kv_bytes_per_block() == runner.block_size * arch.num_layers * row * 4
    ref = hf_logits(path, PROMPTS[3])
    ours = llm.engine.prompt_logits(PROMPTS[3])
    assert (ours - ref).norm() / ref.norm() < 1e-4
    out = llm.generate({"prompt_token_ids": PROMPTS[3]}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    ref_lp = torch.log_softmax(ref, dim=-1)
    for i in range(1, len(PROMPTS[3])):
        assert out.prompt_logprobs[i][PROMPTS[3][i]] == pytest.approx(float(ref_lp[i - 1, PROMPTS[3][i]]), abs=1e-4)
    assert _generate(llm) == expected


def test_plain_softmax_routing_takes_the_fused_router(checkpoint_dir):
    """V2 greedy without scaling (DeepSeek-V2-Lite's routing) is FusedMoE's own softmax top-k."""
    path = checkpoint_dir("deepseek_v2", topk_method="greedy", routed_scaling_factor=1.0)
    llm = LLM(str(path), **LLM_ARGS)
    assert all(moe.router is None for moe in llm.engine.runner.model.moe_layers())
    ref = hf_logits(path, PROMPTS[2])
    assert (llm.engine.prompt_logits(PROMPTS[2]) - ref).norm() / ref.norm() < 1e-4


def test_chunked_prefill_preemption_and_prefix_cache(case):
    """Latent rows written by earlier chunks, recomputed after preemption, or shared through the prefix cache
    give the same tokens."""
    _, path, expected = case
    llm = LLM(str(path), **LLM_ARGS, num_kv_blocks=9, block_size=8, max_num_batched_tokens=16)
    assert _generate(llm) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    again = llm.generate({"prompt_token_ids": PROMPTS[3]}, GREEDY, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == expected[3] and again.num_cached_tokens > 0


def test_data_parallel_expert_parallel_equals_transformers(case):
    """DP=2 with the experts spread over both ranks; for V3 a redundant slot (replicas) and an EPLB rebalance
    (the balancer gets the model's expert groups) between two identical batches."""
    family, path, expected = case
    extra = dict(ep_dispatch="alltoall") if family == "deepseek_v2" else dict(
        ep_dispatch="allgather", num_redundant_experts=1, enable_eplb=True, eplb_step_interval=10**6)
    with LLM(str(path), **LLM_ARGS, data_parallel_size=2, **extra) as llm:
        assert _generate(llm) == expected
        if family == "deepseek_v3":
            stats = llm.rebalance_experts()["stats"]
            assert stats["rebalances"] + stats["skipped"] == 1
            assert _generate(llm) == expected
