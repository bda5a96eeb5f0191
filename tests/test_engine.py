"""Engine core behaviour: errors that lose nothing, aborts, dummy weights, loading failures."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import random_prompts

from elastic import LLM, SamplingParams
from elastic.engine.core import EngineCore
from elastic.protocol.to_engine import EngineCoreRequest


@pytest.fixture(scope="module")
def llm(checkpoint_dir) -> LLM:
    return LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=64)


def test_bad_prompts_raise_and_lose_nothing(llm: LLM):
    good = {"prompt_token_ids": random_prompts((5,))[0]}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = llm.generate([good], params, use_tqdm=False)[0].outputs[0].token_ids
    for bad, match in [({"prompt_token_ids": [5] * 64}, "max_model_len"), ({"prompt_token_ids": []}, "empty"),
                       ({"prompt_token_ids": [10**7]}, "token ids"), (3.5, "prompt must be")]:
        with pytest.raises(ValueError, match=match):
            llm.generate([good, bad], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([good], params, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_abort_frees_blocks(llm: LLM):
    engine: EngineCore = llm.engine
    free = engine.block_manager.num_free_blocks
    for i, p in enumerate(random_prompts((20, 30))):
        engine.add_request(EngineCoreRequest(f"abort-{i}", p, SamplingParams(max_tokens=30, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < free
    outs = engine.abort_requests(["abort-0", "abort-1", "unknown"])
    assert [o.finish_reason for o in outs] == ["abort", "abort"]
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == free


def test_duplicate_request_id_rejected(llm: LLM):
    engine = llm.engine
    req = EngineCoreRequest("dup", [11, 12], SamplingParams(max_tokens=1))
    engine.add_request(req)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(req)
    engine.abort_requests(["dup"])


def test_request_larger_than_cache_rejected(checkpoint_dir):
    llm = LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=256, num_kv_blocks=4, block_size=8)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate([{"prompt_token_ids": [11] * 20}], SamplingParams(max_tokens=100), use_tqdm=False)


def test_dummy_weights_run_without_reading_tensors(checkpoint_dir, tmp_path):
    src = checkpoint_dir("mixtral")
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, only_config / f.name)
    llm = LLM(str(only_config), load_format="dummy", max_model_len=64)
    out = llm.generate(["hello"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5


def test_loading_errors_are_clear(checkpoint_dir, tmp_path):
    src = checkpoint_dir("olmoe")
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        LLM(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not supported.*Qwen3MoeForCausalLM"):
        LLM(str(bad))
    (bad / "config.json").write_text(json.dumps(cfg))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match="cannot read"):
        LLM(str(bad))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        LLM(str(bad))


def test_engine_arg_errors(checkpoint_dir):
    path = str(checkpoint_dir("qwen3_moe"))
    for kwargs, match in [(dict(dtype="int8"), "dtype"), (dict(load_format="pt"), "load_format"),
                          (dict(block_size=7), "block_size"), (dict(gpu_memory_utilization=1.5), "gpu_memory"),
                          (dict(device="tpu"), "device")]:
        with pytest.raises(ValueError, match=match):
            LLM(path, **kwargs)


def test_expert_load_is_recorded(llm: LLM):
    moe = llm.engine.runner.model.moe_layers()[0]
    before = moe.expert_load.clone()
    prompt = random_prompts((10,))[0]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    routed = moe.expert_load - before
    assert int(routed.sum()) == 10 * moe.top_k  # every (token, k) pair counted once


def test_replicated_expert_placement_keeps_outputs(checkpoint_dir):
    """Slots are a placement detail: replicating experts into extra slots must not change greedy output."""
    path = str(checkpoint_dir("qwen3_moe"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts((7, 19))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for moe in llm.engine.runner.model.moe_layers():
        # Swap the first two slots' contents and maps: same function, different layout.
        perm = torch.arange(moe.num_physical)
        perm[[0, 1]] = perm[[1, 0]]
        moe.w13.data.copy_(moe.w13.data[perm])  # in place, as EPLB moves do: graphs keep their pointers
        moe.w2.data.copy_(moe.w2.data[perm])
        moe.set_placement(moe.physical_to_logical[perm])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


def test_transformers_does_not_see_hf_kernels():
    import transformers.utils.import_utils as iu

    assert not iu.is_kernels_available()


def test_step_inputs_match_the_per_token_definition():
    """ModelRunner._prepare builds the step's arrays with numpy; they must be what the per-token definition
    gives: positions start..end of each request, slot = block_table[p // bs] * bs + p % bs, block tables
    padded with 0, and a logit row at each request's last new token when it reaches the sequence's end."""
    import random
    from types import SimpleNamespace

    from elastic.executor.model_runner import ModelRunner
    from elastic.request import SchedulerOutput

    rng, bs = random.Random(0), 16
    scheduled = []
    for num_new in (1, 1, 37, 1, 200, 5):  # decode tokens and prefill chunks, mixed
        computed = rng.randrange(0, 300)
        total = computed + num_new + rng.choice((0, 0, 12))  # some chunks end before the sequence does
        table = rng.sample(range(1, 10_000), -(-total // bs))
        req = SimpleNamespace(num_computed_tokens=computed, all_token_ids=[rng.randrange(1000) for _ in range(total)],
                              block_table=table, num_tokens=total)
        scheduled.append((req, num_new))
    runner = ModelRunner.__new__(ModelRunner)  # no model: only what _prepare reads
    runner.block_size, runner.device = bs, torch.device("cpu")
    input_ids, positions, md, logit_rows = runner._prepare(SchedulerOutput(scheduled))

    want_pos = [p for req, n in scheduled for p in range(req.num_computed_tokens, req.num_computed_tokens + n)]
    want_ids = [req.all_token_ids[p] for req, n in scheduled
                for p in range(req.num_computed_tokens, req.num_computed_tokens + n)]
    want_slots = [req.block_table[p // bs] * bs + p % bs for req, n in scheduled
                  for p in range(req.num_computed_tokens, req.num_computed_tokens + n)]
    width = max(len(req.block_table) for req, _ in scheduled)
    qsl = [0]
    for _, n in scheduled:
        qsl.append(qsl[-1] + n)
    assert positions.tolist() == want_pos and input_ids.tolist() == want_ids
    assert md.slot_mapping.tolist() == want_slots and md.slot_mapping.dtype == torch.long
    assert md.block_tables.tolist() == [req.block_table + [0] * (width - len(req.block_table)) for req, _ in scheduled]
    assert md.block_tables.dtype == md.query_start_loc.dtype == md.seq_lens.dtype == torch.int32
    assert md.query_start_loc.tolist() == qsl and md.query_start_loc_cpu == qsl
    assert md.seq_lens.tolist() == [req.num_computed_tokens + n for req, n in scheduled]
    assert (md.max_query_len, md.max_seq_len) == (200, max(md.seq_lens.tolist()))
    assert logit_rows == [qsl[i + 1] - 1 for i, (req, n) in enumerate(scheduled)
                          if req.num_computed_tokens + n == req.num_tokens]


def test_prefill_warm_up_leaves_no_trace(llm: LLM):
    """The start-up prefill of a dummy prompt (ModelRunner.warm_up_prefill) leaves the KV blocks it wrote
    zeroed, counts no expert load, draws nothing from the sampler's generator, and changes no output."""
    runner = llm.engine.runner
    prompt = random_prompts((13,), seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=6)
    before = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    loads = [m.expert_load.clone() for m in runner.model.moe_layers()]
    for caches in runner.kv_caches:
        for cache in caches:
            cache[:4].fill_(7.0)  # whatever requests left there
    rng = runner.sampler.generator.get_state()
    runner.prefill_dummy()
    assert torch.equal(runner.sampler.generator.get_state(), rng)
    assert all(bool((c[:4] == 0).all()) for caches in runner.kv_caches for c in caches)
    assert all(bool((m.expert_load == 0).all()) for m in runner.model.moe_layers()) and loads
    after = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert after == before


def test_idle_step_joins_every_moe_exchange_in_model_order(llm: LLM):
    """A data-parallel rank with nothing scheduled beside a prefilling rank runs only the MoE layers' exchanges:
    one per MoE layer, in the order a forward of the whole model calls them, under the step's token counts, on
    one row that routes with zero weight (its collectives then pair with every other rank's forward)."""
    from elastic.forward_context import get_forward_context

    runner = llm.engine.runner
    layers = runner.model.moe_layers()
    calls: list[tuple[int, list[int] | None, tuple[int, ...], float]] = []

    def recorder(index: int):
        def exchange(moe, slots, hidden, routing, unreduced=False):  # noqa: ANN001, ANN202
            weights, _ = routing.resolve()
            calls.append((index, get_forward_context().dp_num_tokens, tuple(hidden.shape), float(weights.abs().sum())))
            return torch.zeros_like(hidden)
        return exchange

    for i, moe in enumerate(layers):
        moe.live.ep_comm = recorder(i)
    try:
        runner.dummy_run(3)  # a forward of the whole model
        full, calls[:] = [c[0] for c in calls], []
        runner.idle_step([9, 1], None)
    finally:
        for moe in layers:
            moe.live.ep_comm = None
    assert full == list(range(len(layers))) and [c[0] for c in calls] == full
    assert all(dp == [9, 1] and shape == (1, layers[0].hidden_size) and weight == 0 for _, dp, shape, weight in calls)


def test_step_trace_records_each_step(checkpoint_dir, tmp_path, monkeypatch):
    """ELASTIC_STEP_TRACE: one JSON line per step the engine runs (prefill, then decodes), written at shutdown,
    which benchmarks/step_trace_report.py reads back."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("ELASTIC_STEP_TRACE", str(tmp_path))
    llm = LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=64)
    llm.generate([{"prompt_token_ids": random_prompts((9,), seed=5)[0]}], SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False)
    llm.engine.shutdown()
    (path,) = tmp_path.glob("steps-*.jsonl")
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(s["tokens"], s["decode"], s["dp"], s["rank"]) for s in steps] == [(9, False, None, 0)] + [(1, True, None, 0)] * 3
    assert all(a["t"] <= b["t"] for a, b in zip(steps, steps[1:]))
    spec = importlib.util.spec_from_file_location("report", Path(__file__).parent.parent / "benchmarks/step_trace_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    kinds = {row[0]: row[1] for row in report.summarize(report.load(tmp_path)[0], idle_s=60)}
    assert kinds == {"prefill": 1, "decode graph": 2}


def test_mixed_step_through_graph_buffers_equals_eager(llm: LLM):
    """A mixed step (prompt chunks and a decode) as a mixed-step CUDA graph runs it: padded to a token bucket in
    the graphs' static buffers, padded requests and query rows included. Run eagerly here (no graphs on the
    CPU; the tile-map attention kernel is tested in test_kernels): the same hidden states as the step run
    alone, and the padding rows count no expert load."""
    import math

    from elastic.executor.mixed_graphs import MixedInputs, mixed_sizes
    from elastic.forward_context import ForwardContext, set_forward_context
    from elastic.request import Request, SchedulerOutput

    assert mixed_sizes(300) == [128, 256, 300] and mixed_sizes(128) == [128]
    runner, config = llm.engine.runner, llm.engine.config
    arch, bs = config.model.arch, config.cache.block_size
    scheduled, first_block = [], 0
    for i, (n, done) in enumerate(((13, 0), (5, 0), (1, 9))):  # two prompts, one decode after 9 cached tokens
        req = Request(EngineCoreRequest(f"mixed-{i}", list(range(3, 3 + n + done)), SamplingParams(max_tokens=1)),
                      runner.device)
        req.num_computed_tokens = done
        req.block_table = list(range(first_block, first_block + math.ceil((n + done) / bs)))
        first_block += len(req.block_table)
        scheduled.append((req, n))
    input_ids, positions, md, _ = runner._prepare(SchedulerOutput(scheduled))
    loads = lambda: torch.stack([m.expert_load.clone() for m in runner.moe_layers])  # noqa: E731
    before = loads()
    with torch.inference_mode(), set_forward_context(ForwardContext(attn=md)):
        want = runner.model(input_ids, positions)
    counted = loads() - before
    mixed = MixedInputs(300, 8, md.block_tables.shape[1] + 2, config.model.max_model_len, arch.hidden_size,
                        arch.num_heads, arch.num_kv_heads, config.model.dtype, runner.device)
    size = mixed.size_for(len(input_ids))
    mixed.load(input_ids, positions, md, size)
    before = loads()
    with torch.inference_mode(), set_forward_context(mixed.context(size, 1, False)):
        got = runner.model(mixed.input_ids[:size], mixed.positions[:size])
    assert size == 128 and torch.equal(loads() - before, counted)
    assert torch.equal(got[:len(input_ids)], want)
    assert mixed.tile_map[:, 0].ge(0).sum() == sum(-(-n // mixed.tile_queries) for _, n in scheduled)


def test_step_graph_choice(llm: LLM):
    """Which graph a step replays: decodes up to the largest decode batch take a decode graph, anything else up
    to the step budget the mixed-step graph of its token bucket, larger steps none; captured largest first."""
    from elastic.executor.cuda_graphs import StepGraph, StepGraphs
    from elastic.executor.mixed_graphs import MixedInputs

    runner, arch = llm.engine.runner, llm.engine.config.model.arch
    mixed = MixedInputs(300, 8, 4, 64, arch.hidden_size, arch.num_heads, arch.num_kv_heads, torch.float32, runner.device)
    graphs = StepGraphs(runner.model, 16, 4, 64, arch.hidden_size, torch.float32, runner.device, mixed=mixed)
    assert graphs.choose(5, True) == StepGraph(8) and graphs.choose(16, True) == StepGraph(16)
    assert graphs.choose(17, True) == StepGraph(128, True) and graphs.choose(5, False) == StepGraph(128, True)
    assert graphs.choose(257, False) == StepGraph(300, True) and graphs.choose(301, False) is None
    assert graphs.keys()[:3] == [StepGraph(300, True), StepGraph(256, True), StepGraph(128, True)]
    assert graphs.keys()[-1] == StepGraph(1)
    graphs.mixed = None
    assert graphs.choose(5, False) is None
