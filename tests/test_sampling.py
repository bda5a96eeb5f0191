"""Sampling parameters end to end through `LLM` on a tiny Qwen3-MoE checkpoint."""
from __future__ import annotations

import pytest
import torch
from conftest import random_prompts

from elastic import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=256)


PROMPTS = [{"prompt_token_ids": p} for p in random_prompts((5, 11, 23))]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    first = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    again = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    alone = _tokens(llm.generate(PROMPTS[1:2], params, use_tqdm=False))
    assert first == again
    assert alone[0] == first[1]
    other = _tokens(llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=99, max_tokens=16,
                                                         ignore_eos=True), use_tqdm=False))
    assert other != first


def test_n_samples_are_distinct_and_reproducible(llm: LLM):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) == 3
    assert [c.token_ids for c in llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs] == samples


def test_max_tokens_and_length_finish(llm: LLM):
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    for o in out:
        assert len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length"


def test_max_model_len_caps_generation(checkpoint_dir):
    llm = LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=32)
    out = llm.generate([{"prompt_token_ids": [20] * 30}], SamplingParams(temperature=0, max_tokens=None,
                                                                       ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_min_tokens(llm: LLM):
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ref = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = ref[4]
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                   stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    cut = ref.index(stop_id) + 1
    assert out.token_ids == ref[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens masks the stop id until enough tokens exist, so the first stop comes later (or never).
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=cut + 2,
                                                   stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= cut + 2
    assert stop_id not in out.token_ids[:cut + 1]


def test_eos_stops_unless_ignored(llm: LLM):
    eos = llm.tokenizer.eos_token_id
    bias = {eos: 100.0}  # make EOS the argmax
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10, logit_bias=bias),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10, logit_bias=bias, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] * 10 and out.finish_reason == "length"


def test_stop_strings_cut_text(llm: LLM):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ref = llm.generate(PROMPTS[:1], greedy, use_tqdm=False)[0].outputs[0].text
    assert len(ref) > 10
    stop = ref[6:9]
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00"]),
                       use_tqdm=False)[0].outputs[0]
    pos = ref.find(stop)
    assert out.text == ref[:pos] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop,
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == ref[:pos + len(stop)]


def test_logprobs_match_reference_distribution(llm: LLM):
    prompt = PROMPTS[1]["prompt_token_ids"]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=4, logprobs=5,
                                                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    ref = torch.log_softmax(llm.engine.prompt_logits(prompt + out.token_ids[:-1]), dim=-1)
    total = 0.0
    for step, (token, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + step]
        assert token in lps and len(lps) <= 6
        assert lps[token] == pytest.approx(float(row[token]), abs=1e-4)
        assert lps[token] == pytest.approx(max(lps.values()))  # greedy picks the top token
        top5 = row.topk(5).indices.tolist()
        assert set(top5) <= set(lps)
        total += lps[token]
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_prompt_logprobs(llm: LLM):
    prompt = PROMPTS[2]["prompt_token_ids"]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2),
                       use_tqdm=False)[0]
    ref = torch.log_softmax(llm.engine.prompt_logits(prompt), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert out.prompt_logprobs[i][prompt[i]] == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)


def test_sampling_filters_restrict_choices(llm: LLM):
    prompt = PROMPTS[0]["prompt_token_ids"]
    greedy = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1),
                          use_tqdm=False)[0].outputs[0].token_ids
    for params in (SamplingParams(temperature=1.5, top_k=1, max_tokens=1, seed=s) for s in range(5)):
        assert llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids == greedy
    for params in (SamplingParams(temperature=1.5, min_p=1.0, max_tokens=1, seed=s) for s in range(5)):
        assert llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids == greedy


def test_repetition_penalty_matches_transformers(checkpoint_dir):
    from transformers import AutoModelForCausalLM

    path = checkpoint_dir("qwen3_moe")
    llm = LLM(str(path), max_model_len=256)
    prompt = PROMPTS[1]["prompt_token_ids"]
    ours = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                                       repetition_penalty=1.8), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, repetition_penalty=1.8,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours[0].outputs[0].token_ids == ref


def test_presence_and_frequency_penalties_reduce_repeats(llm: LLM):
    prompt = PROMPTS[0]["prompt_token_ids"]
    base = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    pen = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                                      frequency_penalty=2.0, presence_penalty=2.0),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(pen)) >= len(set(base))
    assert max(pen.count(t) for t in pen) <= max(base.count(t) for t in base)


def test_text_detokenizes_multibyte_exactly(llm: LLM):
    outs = llm.generate(["héllo wörld 你好 🎉 ünïcödé"] * 2, SamplingParams(temperature=1.0, seed=5, max_tokens=30,
                                                                           ignore_eos=True), use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_chat_uses_template(llm: LLM):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    expected = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert out.prompt_token_ids == list(expected) and len(out.outputs[0].token_ids) == 4
    assert len(llm.chat([msgs, msgs[1:]], use_tqdm=False)) == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=100), "logprobs"), (dict(stop=[""]), "stop"), (dict(top_k=-5), "top_k"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
