"""Pipelined decode (--async-scheduling, engine/pipeline.py): the same tokens and finishes as stepping one
step at a time, with requests that stop on a token mid-pipeline, stop by length, arrive and are aborted while
a step is on its way, and leave (migration) with one on its way."""
from __future__ import annotations

import pytest
from checkpoints import hf_greedy
from conftest import random_prompts

from elastic import LLM, SamplingParams
from elastic.engine.core import EngineCore
from elastic.protocol.to_engine import EngineCoreRequest


@pytest.fixture(scope="module")
def engines(checkpoint_dir) -> tuple[LLM, LLM]:
    path = str(checkpoint_dir("qwen3_moe"))
    # Small blocks: steps cross block boundaries often, so a pipelined launch allocates blocks too.
    return (LLM(path, max_model_len=96, block_size=8),
            LLM(path, max_model_len=96, block_size=8, async_scheduling=True))


def _run(engine: EngineCore, requests: list[EngineCoreRequest], arrivals: dict[int, list[EngineCoreRequest]],
         aborts: dict[int, list[str]], on_the_way: list[bool] | None = None
         ) -> tuple[dict[str, list[int]], dict[str, str | None], int]:
    """Step `engine` until done; request lists arrive / are aborted before the given step (`on_the_way` gets,
    for each such step, whether a pipelined step was on its way then). -> tokens and finish reason per
    request, and how many steps the model runner launched pipelined."""
    launched = 0
    launch = engine.runner.launch_decode

    def counting(*args, **kwargs):
        nonlocal launched
        launched += 1
        return launch(*args, **kwargs)

    engine.runner.launch_decode = counting
    tokens: dict[str, list[int]] = {}
    finish: dict[str, str | None] = {}
    for req in requests:
        engine.add_request(req)
    step = 0
    try:
        while engine.has_unfinished_requests() or step <= max([*arrivals, *aborts], default=0):
            if on_the_way is not None and (step in arrivals or step in aborts):
                on_the_way.append(engine.pipeline is not None and engine.pipeline.inflight is not None)
            for req in arrivals.get(step, []):
                engine.add_request(req)
            for out in engine.abort_requests(aborts.get(step, [])):
                finish[out.request_id] = out.finish_reason
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finish[out.request_id] = out.finish_reason
            step += 1
    finally:
        engine.runner.launch_decode = launch
    return tokens, finish, launched


def _requests(prompts: list[list[int]], stop_on: dict[int, int], prefix: str = "r",
              max_tokens: tuple[int, ...] = (1, 2, 5, 24, 40)) -> list[EngineCoreRequest]:
    reqs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=max_tokens[i % len(max_tokens)],
                                stop_token_ids=[stop_on[i]] if i in stop_on else None)
        reqs.append(EngineCoreRequest(f"{prefix}{i}", prompt, params))
    return reqs


def test_pipelined_tokens_and_finishes_equal_stepwise(engines: tuple[LLM, LLM]) -> None:
    stepwise, pipelined = engines[0].engine, engines[1].engine
    prompts = random_prompts((7, 12, 5, 9, 16, 3, 11, 20), seed=7)
    # A stop token for two requests, taken from what they generate, so they stop mid-generation.
    probe, _, _ = _run(stepwise, _requests(prompts, {}, "probe"), {}, {})
    stop_on = {3: probe["probe3"][6], 8 % len(prompts): probe["probe3"][3]}
    expected, expected_finish, launched = _run(stepwise, _requests(prompts, stop_on), {}, {})
    assert launched == 0
    got, got_finish, launched = _run(pipelined, _requests(prompts, stop_on), {}, {})
    assert got == expected and got_finish == expected_finish
    assert launched > 20  # most decode steps went pipelined
    assert expected_finish["r3"] == "stop" and len(expected["r3"]) < 24
    assert not pipelined.has_unfinished_requests() and pipelined.pipeline.inflight is None
    assert pipelined.block_manager.num_free_blocks == stepwise.block_manager.num_free_blocks
    # And the reference nobody here wrote.
    assert [expected[f"r{i}"] for i in (3, 4)] == [
        hf_greedy_stopping(engines[0], prompts[i], 24 if i == 3 else 40, stop_on.get(i)) for i in (3, 4)]


def hf_greedy_stopping(llm: LLM, prompt: list[int], max_tokens: int, stop: int | None) -> list[int]:
    tokens = hf_greedy(llm.config.model.model, [prompt], max_tokens)[0]
    return tokens[:tokens.index(stop) + 1] if stop is not None and stop in tokens else tokens


def test_arrivals_and_aborts_while_a_step_is_on_its_way(engines: tuple[LLM, LLM]) -> None:
    stepwise, pipelined = engines[0].engine, engines[1].engine
    first = random_prompts((6, 10, 14), seed=11)
    later = random_prompts((8, 5), seed=12)
    alone, _, _ = _run(stepwise, _requests(first + later, {}, "x", (20,)), {}, {})
    reqs = _requests(first, {}, "x", (20,))
    arrivals = {6: _requests(later, {}, "late", (20,))}
    on_the_way: list[bool] = []
    got, finish, launched = _run(pipelined, reqs, arrivals, {9: ["x2"]}, on_the_way)
    assert launched > 5 and finish["x2"] == "abort" and on_the_way == [True, True]
    for i in range(len(first)):
        if i != 2:
            assert got[f"x{i}"] == alone[f"x{i}"]
    assert got["x2"] == alone["x2"][:len(got["x2"])]  # what it got before the abort is right
    for i in range(len(later)):
        assert got[f"late{i}"] == alone[f"x{len(first) + i}"]
    assert not pipelined.has_unfinished_requests()


def test_leaving_with_a_step_on_its_way_hands_back_only_reported_tokens(engines: tuple[LLM, LLM]) -> None:
    pipelined = engines[1].engine
    prompt = random_prompts((9,), seed=21)[0]
    pipelined.add_request(EngineCoreRequest("m", prompt, SamplingParams(temperature=0, max_tokens=30)))
    reported: list[int] = []
    while pipelined.pipeline.inflight is None or len(reported) < 4:
        reported += [t for out in pipelined.step() for t in out.new_token_ids]
    (req,) = pipelined.take_requests()
    assert req.output_token_ids == reported  # the token on its way is dropped, not half-reported
    assert pipelined.pipeline.inflight is None and not pipelined.has_unfinished_requests()


def test_seeded_sampling_pipelined_and_after_leaving_equals_stepwise(engines: tuple[LLM, LLM]) -> None:
    """Sampled (seeded) requests pipeline too: the same tokens as stepwise; and a request handed to another
    engine while a step is on its way continues there exactly as if it had never moved (the dropped step's
    draws are put back on its generator)."""
    stepwise, pipelined = engines[0].engine, engines[1].engine
    prompts = random_prompts((9, 14, 6), seed=31)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=30),
              SamplingParams(temperature=1.2, top_k=20, seed=6, max_tokens=30),
              SamplingParams(temperature=0, max_tokens=30)]
    requests = [EngineCoreRequest(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    expected, _, _ = _run(stepwise, requests, {}, {})
    got, _, launched = _run(pipelined, [EngineCoreRequest(f"s{i}", p, sp) for i, (p, sp) in
                                        enumerate(zip(prompts, params))], {}, {})
    assert got == expected and launched > 10
    # Leave mid-way (a step on its way), resume on the stepwise engine from what was reported.
    pipelined.add_request(EngineCoreRequest("m", prompts[0], params[0]))
    reported: list[int] = []
    while pipelined.pipeline.inflight is None or len(reported) < 7:
        reported += [t for out in pipelined.step() for t in out.new_token_ids]
    (req,) = pipelined.take_requests()
    resumed = EngineCoreRequest("m2", prompts[0], params[0], resumed_token_ids=reported,
                                generator_state=req.generator_state())
    rest, _, _ = _run(stepwise, [resumed], {}, {})
    assert reported + rest["m2"] == expected["s0"]


def test_next_launch_waits_until_the_step_on_its_way_nearly_ends(engines: tuple[LLM, LLM]) -> None:
    """The launch is due the last timed step's device time after a read, less the host's launch time and a
    margin; the process takes inputs until then (EngineCoreProc._await_launch). A step another rank prefilled
    beside is not a measure. Timings are injected: the CPU has none."""
    from types import SimpleNamespace

    from elastic.engine.pipeline import LAUNCH_MARGIN_S

    pipeline = engines[1].engine.pipeline
    assert pipeline is not None and pipeline.inflight is None
    assert pipeline.launch_wait_s() == 0.0  # nothing on its way: step at once
    pipeline.inflight = SimpleNamespace(step=None)  # a step on its way
    try:
        pipeline.launch_s = 0.002
        pipeline._schedule_launch(SimpleNamespace(step=SimpleNamespace(device_seconds=0.020), timed=True))
        wait = pipeline.launch_wait_s()
        assert 0.010 < wait <= 0.020 - 0.002 - LAUNCH_MARGIN_S
        pipeline._schedule_launch(SimpleNamespace(step=SimpleNamespace(device_seconds=0.200), timed=False))
        pipeline._schedule_launch(SimpleNamespace(step=SimpleNamespace(device_seconds=None), timed=True))  # CPU
        assert pipeline.device_s == pytest.approx(0.020)
    finally:
        pipeline.inflight, pipeline.launch_due = None, None
        pipeline.device_s, pipeline.launch_s = None, None
    assert pipeline.launch_wait_s() == 0.0


def test_a_peer_failure_drops_both_steps_and_puts_the_draws_back(checkpoint_dir) -> None:
    """A peer failing while a pipelined step is read (the next one launched already): neither step is
    reported, the generators of seeded requests end as before the first, and after the recovery (here: the
    flag cleared) the engine computes the same tokens as an undisturbed run."""
    path = str(checkpoint_dir("qwen3_moe"))
    prompts = random_prompts((9, 14), seed=11)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=8)
    reqs = lambda: [EngineCoreRequest(f"s{i}", p, params) for i, p in enumerate(prompts)]  # noqa: E731
    expected, _, _ = _run(LLM(path, max_model_len=96, block_size=8).engine, reqs(), {}, {})
    engine = LLM(path, max_model_len=96, block_size=8, async_scheduling=True).engine
    for req in reqs():
        engine.add_request(req)
    tokens: dict[str, list[int]] = {}

    def collect(outputs) -> None:  # noqa: ANN001
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    while engine.pipeline.inflight is None:  # prefill, then the first pipelined launch
        collect(engine.step())
    # As the next step (launched now, read next) is to find them: both it and the one after are voided.
    states = {r.request_id: r.generator.get_state() for r in engine.scheduler.running}
    collect(engine.step())  # steady: one launched ahead, one read
    launch = engine.runner.launch_decode

    def launch_then_fail(*args, **kwargs):  # the peer fails after the next launch, before the read
        step = launch(*args, **kwargs)
        engine.peer_failed.set()
        return step

    engine.runner.launch_decode = launch_then_fail
    try:
        with pytest.raises(RuntimeError, match="peer"):
            engine.step()
    finally:
        engine.runner.launch_decode = launch
    assert engine.pipeline.inflight is None
    assert all(bool((r.generator.get_state() == states[r.request_id]).all()) for r in engine.scheduler.running)
    engine.peer_failed.clear()
    while engine.has_unfinished_requests():
        collect(engine.step())
    assert tokens == expected


def test_a_dropped_pipelined_engine_is_freed_at_once(checkpoint_dir) -> None:
    """The engine owns its decode pipeline and the pipeline refers back to it by proxy: with no reference cycle,
    an LLM shut down and dropped frees its engine (and so its GPU memory) at once, not at the cycle collector's
    next pass (a process building several engines one after another ran out of GPU memory before)."""
    import gc
    import weakref

    llm = LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=64, async_scheduling=True)
    assert llm.engine.pipeline is not None
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    engine = weakref.ref(llm.engine)
    gc.disable()
    try:
        llm.shutdown()
        del llm
        assert engine() is None
    finally:
        gc.enable()
