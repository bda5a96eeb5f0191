"""Data parallelism through the offline `LLM`: N engine-core processes (gloo on loopback), the DP coordinator
and its request waves, routing. Greedy outputs must equal the single-rank engine's (itself checked against
transformers in test_equivalence.py; one family here is also checked against transformers directly)."""
from __future__ import annotations

import time

import pytest
from checkpoints import hf_greedy
from conftest import random_prompts
from server_fixtures import wait_until

from elastic import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = random_prompts((4, 9, 15, 22, 31, 7), seed=5)
LLM_ARGS = dict(device="cpu", dtype="float32", max_model_len=128)


@pytest.fixture(scope="module")
def single_rank(checkpoint_dir):
    """family -> (checkpoint path, greedy token ids of the single-rank engine for PROMPTS)."""
    cache: dict[str, tuple[str, list[list[int]]]] = {}

    def get(family: str) -> tuple[str, list[list[int]]]:
        if family not in cache:
            path = str(checkpoint_dir(family))
            outs = LLM(path, **LLM_ARGS).generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY,
                                                  use_tqdm=False)
            cache[family] = (path, [o.outputs[0].token_ids for o in outs])
        return cache[family]

    return get


def counters(llm: LLM) -> list[dict[str, int]]:
    assert llm.dp is not None
    return [llm.dp.call_utility(i, "counters") for i in range(llm.config.parallel.data_parallel_size)]


def at_rest(llm: LLM) -> list[dict[str, int]] | None:
    """Every rank's counters once none is in a wave, else None."""
    now = counters(llm)
    return None if any(c["running"] for c in now) else now


def assert_quiet(llm: LLM) -> list[dict[str, int]]:
    """Once every rank has left the wave (a request's last token comes a step before the step in which all
    ranks see that nobody has work), no rank steps at rest, and all stepped equally (lockstep)."""
    settled = wait_until(lambda: at_rest(llm), 10, "every rank to leave the wave")
    time.sleep(0.5)  # observing that nothing happens takes some time; nothing waits on a result here
    after = counters(llm)
    assert [c["steps"] for c in after] == [c["steps"] for c in settled], "a rank steps while the system is idle"
    assert len({c["steps"] for c in after}) == 1, f"ranks out of lockstep: {after}"
    assert len({c["wave"] for c in after}) == 1, f"ranks disagree on the wave number: {after}"
    return after


@pytest.mark.parametrize("family, world, mode, redundant", [
    ("qwen3_moe", 2, "alltoall", 0),
    ("qwen2_moe", 2, "allgather", 0),   # shared expert included
    ("qwen2_moe", 3, "alltoall", 1),    # 8 experts + 1 replica = 3 slots per rank
    ("mixtral", 3, "allgather", 1),
])
def test_llm_greedy_equals_single_rank(single_rank, family: str, world: int, mode: str, redundant: int) -> None:
    path, expected = single_rank(family)
    with LLM(path, **LLM_ARGS, data_parallel_size=world, ep_dispatch=mode, num_redundant_experts=redundant) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert [o.prompt_token_ids for o in outs] == PROMPTS  # input order
        assert [o.outputs[0].token_ids for o in outs] == expected
        stats = assert_quiet(llm)
        # The burst was spread over every rank, and the ranks stepped together.
        assert sum(c["requests"] for c in stats) == len(PROMPTS)
        assert all(c["requests"] > 0 for c in stats), stats


def test_llm_matches_transformers_and_serves_several_waves(single_rank) -> None:
    path, expected = single_rank("qwen2_moe")
    assert hf_greedy(path, PROMPTS[:2], GREEDY.max_tokens) == expected[:2]
    with LLM(path, **LLM_ARGS, data_parallel_size=2) as llm:
        # A lone request goes to one rank (rank 0: ties go to the lowest index); the other rank runs dummy
        # steps with it, and both stop with the wave.
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY, use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected[0]
        first = assert_quiet(llm)
        assert all(c["wave"] == 1 for c in first), first
        assert [c["requests"] for c in first] == [1, 0]
        assert first[1]["steps"] == first[0]["steps"] >= GREEDY.max_tokens
        # The next batch is a new wave; chat and seeded sampling go through the same path.
        params = [GREEDY, SamplingParams(temperature=1.0, seed=7, max_tokens=6, n=2)]
        outs = llm.generate([{"prompt_token_ids": PROMPTS[1]}, {"prompt_token_ids": PROMPTS[2]}], params,
                            use_tqdm=False)
        assert outs[0].outputs[0].token_ids == expected[1]
        assert len(outs[1].outputs) == 2 and all(len(c.token_ids) == 6 for c in outs[1].outputs)
        ref = LLM(path, **LLM_ARGS).generate({"prompt_token_ids": PROMPTS[2]}, params[1], use_tqdm=False)[0]
        assert [c.token_ids for c in outs[1].outputs] == [c.token_ids for c in ref.outputs]
        chat = llm.chat([{"role": "user", "content": "hello"}], GREEDY, use_tqdm=False)
        assert len(chat[0].outputs[0].token_ids) == GREEDY.max_tokens
        assert all(c["wave"] == 3 for c in assert_quiet(llm)), "three batches, three waves"
        # A bad request is refused before anything is queued; the engines serve on.
        with pytest.raises(ValueError, match="token ids"):
            llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [10**7]}], GREEDY, use_tqdm=False)
        assert llm.generate({"prompt_token_ids": PROMPTS[3]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids \
            == expected[3]
    assert llm.dp is not None
    procs = [e.proc for e in llm.dp.engine.client.engines]
    assert all(p is not None and not p.is_alive() and p.exitcode == 0 for p in procs)


def test_pipelined_ranks_equal_single_rank(single_rank) -> None:
    """Pipelined decode with data parallelism: each launch pairs with the other ranks' steps in the per-step
    exchange, whether they pipeline, prefill or run dummy steps (requests of different lengths, so ranks go
    idle at different times, and a second batch arriving while the first decodes)."""
    path, _ = single_rank("qwen3_moe")
    lengths = [3, 17, 9, 24, 1, 12]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in LLM(path, **LLM_ARGS).generate(prompts, params, use_tqdm=False)]
    with LLM(path, **LLM_ARGS, data_parallel_size=2, async_scheduling=True) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        lone = llm.generate(prompts[3], params[3], use_tqdm=False)  # one rank decodes, the other idles
        assert lone[0].outputs[0].token_ids == expected[3]
        stats = wait_until(lambda: at_rest(llm), 10, "every rank to leave the wave")
        assert all(c["pipelined"] > 0 for c in stats), stats


def test_graph_paths_with_data_parallelism_equal_single_rank(single_rank, monkeypatch) -> None:
    """The CUDA-graph paths under data parallelism, emulated on the CPU (ELASTIC_EMULATE_CUDA_GRAPHS: each
    replay is an eager forward over the graphs' padded buffers): every rank replays the graph all agreed on,
    a decode batch's or, in a step with a prompt anywhere, the mixed-step graph of the largest rank's token
    bucket, which a rank that only decodes or idles replays padded. Few sequences per rank, requests of
    different lengths, pipelined: prompts are admitted beside decodes on one rank while the other decodes or
    idles. Greedy outputs equal one rank's eager ones (and one rank's through its graphs), both kinds of graphs
    served steps on every rank, and no step ran eagerly."""
    path, _ = single_rank("qwen3_moe")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9, 24, 1, 12)]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    expected = [o.outputs[0].token_ids for o in LLM(path, **LLM_ARGS).generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("ELASTIC_EMULATE_CUDA_GRAPHS", "1")  # (inherited by the engine processes)
    one = LLM(path, **LLM_ARGS, max_num_seqs=2)  # one rank picks its graphs itself
    assert [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)] == expected
    kinds = one.engine.runner.steps_by_kind
    assert kinds["decode_graph"] > 0 and kinds["mixed_graph"] > 0 and kinds["eager"] == 0, kinds
    lone = LLM(path, **LLM_ARGS, max_num_seqs=1)  # graphs of one sequence (its start-up warm-up too)
    assert [o.outputs[0].token_ids for o in lone.generate(prompts[:2], params[:2], use_tqdm=False)] == expected[:2]
    with LLM(path, **LLM_ARGS, data_parallel_size=2, ep_dispatch="allgather", max_num_seqs=2,
             async_scheduling=True) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        stats = wait_until(lambda: at_rest(llm), 10, "every rank to leave the wave")
        kinds = [c["steps_by_kind"] for c in stats]
        assert all(k["decode_graph"] > 0 and k["mixed_graph"] > 0 and k["eager"] == 0 for k in kinds), kinds
