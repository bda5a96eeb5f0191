"""Every family against transformers' own forward and greedy generate (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch
from checkpoints import hf_greedy, hf_logits
from conftest import FAMILIES, random_prompts

from elastic import LLM, SamplingParams

MAX_NEW = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request, checkpoint_dir):
    """(family, checkpoint path, prompts, transformers' greedy continuations)."""
    path = checkpoint_dir(request.param)
    prompts = random_prompts()
    return request.param, path, prompts, hf_greedy(path, prompts, MAX_NEW)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_prefill_logits_match_transformers(family_case):
    _, path, prompts, _ = family_case
    llm = LLM(str(path), max_model_len=256)
    for prompt in prompts[2:]:
        ours = llm.engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        rel = (ours - ref).norm() / ref.norm()
        assert rel < 1e-4, f"relative logit error {rel:.2e}"


def test_greedy_matches_transformers_generate(family_case):
    _, path, prompts, expected = family_case
    llm = LLM(str(path), max_model_len=256)
    assert _generate(llm, prompts) == expected


def test_greedy_with_preemption_and_chunked_prefill(family_case):
    """A cache too small for the batch forces recompute-preemption; a small token budget forces chunks."""
    _, path, prompts, expected = family_case
    llm = LLM(str(path), max_model_len=256, num_kv_blocks=12, block_size=8, max_num_batched_tokens=16,
              enable_prefix_caching=False)
    assert _generate(llm, prompts) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 12  # everything returned


def test_prefix_caching_gives_same_output(checkpoint_dir):
    path = checkpoint_dir("qwen3_moe")
    shared = random_prompts((40,), seed=3)[0]
    prompts = [shared + [11, 12], shared + [13], shared + [11, 12]]
    expected = hf_greedy(path, prompts, 8)
    llm = LLM(str(path), max_model_len=256, block_size=8)
    outs = []
    for p in prompts:  # one at a time, so later ones find the earlier ones' blocks
        outs += llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert outs[0].num_cached_tokens == 0
    assert outs[1].num_cached_tokens == 40 and outs[2].num_cached_tokens == 40


def test_sharded_checkpoint_loads(checkpoint_dir, tmp_path):
    from checkpoints import make_checkpoint

    single = checkpoint_dir("qwen2_moe")
    sharded = make_checkpoint("qwen2_moe", tmp_path / "sharded", shard=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    prompt = random_prompts((12,))[0]
    a = LLM(str(single), max_model_len=128).engine.prompt_logits(prompt)
    b = LLM(str(sharded), max_model_len=128).engine.prompt_logits(prompt)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
