"""EPLB at run time: expert load recorded per slot, forced and periodic rebalances that move weights between
ranks, with greedy outputs identical to the single-rank engine before, during and after (DP=2 and 3, with and
without redundant experts, uneven splits), the same maps on every rank, and balancedness that rises on
skewed routing."""
from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import random_prompts
from server_fixtures import wait_until

from elastic import LLM, SamplingParams
from elastic.config import create_engine_config
from elastic.frontend.eplb_client import rebalance_experts
from elastic.kernels.routing import route_to_slots_reference

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = random_prompts((5, 11, 17, 8, 23, 3), seed=11)
ARGS = dict(device="cpu", dtype="float32", max_model_len=128)
# 4 experts (top-2) on 3 ranks: 2 slots per rank, so 2 of the 6 slots hold replicas.
UNEVEN = dict(num_experts=4, num_experts_per_tok=2, router_zipf=1.5)


def _greedy(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                         use_tqdm=False)]


@pytest.fixture(scope="module")
def skewed(checkpoint_dir):
    """A checkpoint with Zipf-skewed routing and its single-rank greedy outputs (EPLB off)."""
    path = str(checkpoint_dir("qwen3_moe", router_zipf=1.5))
    return path, _greedy(LLM(path, **ARGS))


def test_rebalances_keep_outputs_and_spread_load_over_three_ranks(skewed) -> None:
    path, expected = skewed
    with LLM(path, **ARGS, data_parallel_size=3, enable_eplb=True, num_redundant_experts=1,
             eplb_step_interval=10**6) as llm:
        assert _greedy(llm) == expected
        first = llm.rebalance_experts()
        stats = first["stats"]
        assert stats["rebalances"] == 1 and stats["slots_moved"] > 0 and stats["bytes_moved"] > 0
        assert stats["balancedness"] > stats["balancedness_before"]  # skewed load: the policy spreads it
        assert first["slots_per_rank"] == 3  # ceil((8 + 1) / 3)
        # Every rank switched to the same maps.
        assert all(llm.eplb_state(r)["physical_to_logical"] == first["physical_to_logical"] for r in range(3))
        assert _greedy(llm) == expected
        # A rebalance racing a new burst: both finish, and the burst's outputs are unchanged.
        dp = llm.dp
        assert dp is not None
        burst = [(f"race-{i}", None, p, GREEDY) for i, p in enumerate(PROMPTS)]

        async def race():
            gen = asyncio.get_running_loop().run_in_executor(None, dp.generate_batch, burst)
            return await asyncio.gather(gen, rebalance_experts(dp.engine.client))

        outs, state = asyncio.run_coroutine_threadsafe(race(), dp.loop).result(120)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert state["stats"]["rebalances"] + state["stats"]["skipped"] >= 2


def test_uneven_split_and_periodic_rebalances_during_generation(checkpoint_dir) -> None:
    path = str(checkpoint_dir("qwen3_moe", **UNEVEN))
    expected = _greedy(LLM(path, **ARGS))
    with LLM(path, **ARGS, data_parallel_size=3, ep_dispatch="allgather", enable_eplb=True,
             eplb_config='{"step_interval": 3, "window_size": 4, "min_gain": 0.0}') as llm:
        for round_ in (1, 2):
            assert _greedy(llm) == expected  # rebalances start every 3 steps while these run
            # The ranks go on stepping (dummy steps) until a rebalance under way is done.
            wait_until(lambda: not any(llm.eplb_state(r)["in_progress"] for r in range(3)), 60, "rebalance end")
            states = [llm.eplb_state(r) for r in range(3)]
            assert states[0]["stats"]["rebalances"] >= round_
            assert all(s["physical_to_logical"] == states[0]["physical_to_logical"] for s in states)
        assert states[0]["slots_per_rank"] == 2 and len(states[0]["physical_to_logical"][0]) == 6


def test_single_rank_rebalance_is_a_no_op_that_keeps_serving(checkpoint_dir) -> None:
    path = str(checkpoint_dir("qwen3_moe", **UNEVEN))
    llm = LLM(path, **ARGS, enable_eplb=True, num_redundant_experts=2)
    expected = _greedy(llm)
    state = llm.rebalance_experts()
    assert state["stats"]["skipped"] == 1  # one rank: every placement is balanced
    assert _greedy(llm) == expected
    moe = llm.engine.runner.model.moe_layers()[0]
    assert int(moe.expert_load.sum()) == 0  # the balancer moved each step's counts into its window
    assert int(llm.engine.balancer.window.sum()) > 0


def test_padding_rows_count_no_load() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    l2p = torch.tensor([[0, 4], [1, -1], [2, -1], [3, 5]])
    counts = torch.tensor([2, 1, 1, 2])
    load = torch.zeros(6, dtype=torch.long)
    _, physical, local = route_to_slots_reference(logits, 2, True, l2p, counts, load, 0, 6,
                                                  num_valid=torch.tensor([4]))
    assert int(load.sum()) == 4 * 2  # rows 4 and 5 are padding
    assert (physical[4:] == -1).all() and (local[4:] == -1).all()  # ...sent to no expert, on no rank
    assert (physical[:4] >= 0).all()


def test_eplb_config_json_and_flags_agree(checkpoint_dir) -> None:
    path = str(checkpoint_dir("qwen3_moe"))
    from_json = create_engine_config(path, device="cpu", eplb_config={"window_size": 7, "num_redundant_experts": 2})
    assert (from_json.eplb.eplb_window_size, from_json.parallel.num_redundant_experts) == (7, 2)
    with pytest.raises(ValueError, match="unknown key"):
        create_engine_config(path, device="cpu", eplb_config='{"window": 7}')
    with pytest.raises(ValueError, match="also given"):
        create_engine_config(path, device="cpu", eplb_window_size=5, eplb_config='{"window_size": 7}')
