"""The API process's engine (AsyncLLM + EngineCoreClient) against a real engine core process, without HTTP;
and the wire format of every message type."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest
from checkpoints import make_checkpoint
from server_fixtures import parse_metrics

from elastic.config import ParallelConfig, create_engine_config
from elastic.frontend.async_llm import AsyncLLM, RequestRejectedError
from elastic.metrics import ServerMetrics
from elastic.protocol import from_engine, to_engine
from elastic.sampling_params import SamplingParams


def test_every_message_round_trips_through_msgspec() -> None:
    enc = msgspec.msgpack.Encoder()
    params = SamplingParams(temperature=0.5, stop=["x"], logit_bias={3: 1.0}, seed=7)
    inputs = [to_engine.EngineCoreRequest("r", [1, 2], params, eos_token_id=2, arrival_time=1.5),
              to_engine.AbortRequests(["r", "s"]), to_engine.UtilityCall(3, "ping", [1, "a"]),
              to_engine.ShutdownEngine()]
    dec = msgspec.msgpack.Decoder(to_engine.EngineCoreInput)
    assert [dec.decode(enc.encode(m)) for m in inputs] == inputs

    lp = from_engine.TokenLogprobs([5, 6], [-0.1, -2.0], 1)
    outputs = [from_engine.EngineCoreOutputs(
        engine_index=1, timestamp=2.5,
        outputs=[from_engine.EngineCoreOutput("r", [5], new_logprobs=[lp], finish_reason="stop", stop_reason=5)],
        scheduler_stats=from_engine.SchedulerStats(1, 2, 0.25, 3), queue_times={"r": 0.01},
        rejected=[from_engine.RejectedRequest("s", "bad")],
        utility_results=[from_engine.UtilityResult(3, result="pong")]),
        from_engine.EngineDead(0, "boom")]
    dec = msgspec.msgpack.Decoder(from_engine.EngineCoreOutputMessage)
    assert [dec.decode(enc.encode(m)) for m in outputs] == outputs

    handshake = [from_engine.EngineHello(0, 123), from_engine.EngineReady(0, 10, 16, 256),
                 from_engine.EngineStartupFailed(0, "no")]
    dec = msgspec.msgpack.Decoder(from_engine.EngineHandshakeMessage)
    assert [dec.decode(enc.encode(m)) for m in handshake] == handshake
    addresses = to_engine.HandshakeAddresses("ipc:///a", "ipc:///b", ParallelConfig(2, 1))
    assert msgspec.msgpack.decode(enc.encode(addresses), type=to_engine.HandshakeAddresses) == addresses


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt"))


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_async_llm_against_an_engine_process(checkpoint: Path, transport: str) -> None:
    config = create_engine_config(str(checkpoint), device="cpu", dtype="float32", max_model_len=256,
                                  max_num_seqs=8, served_model_name="m")
    metrics = ServerMetrics("m", 256)

    async def main() -> None:
        engine = AsyncLLM(config, metrics=metrics, address="127.0.0.1" if transport == "tcp" else None)
        assert engine.status() is not None and "starting" in engine.status()
        await engine.start()
        client = engine.client
        proc = client.engines[0].proc
        assert client.input_address.startswith(f"{transport}://")
        try:
            assert engine.status() is None
            assert await client.call_utility(0, "ping") == "pong"
            assert (await client.call_utility(0, "stats"))["num_running"] == 0
            with pytest.raises(RuntimeError, match="unknown utility"):
                await client.call_utility(0, "exec")

            greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            outs = [o async for o in engine.generate("a", None, [10, 11, 12, 13], greedy)]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 8
            assert [len(o.outputs[0].token_ids) for o in outs] == sorted(len(o.outputs[0].token_ids) for o in outs)

            # Closing the iterator early aborts the request in the engine.
            gen = engine.generate("b", None, [20, 21, 22], SamplingParams(max_tokens=200, ignore_eos=True))
            await gen.__anext__()
            await gen.aclose()
            assert "b" not in engine.requests

            async def engine_idle() -> None:
                while (await client.call_utility(0, "stats"))["num_running"]:
                    await asyncio.sleep(0.02)

            await asyncio.wait_for(engine_idle(), 10)

            # The engine re-validates: what slips past the front end is rejected, not fatal.
            with pytest.raises(RequestRejectedError, match="token ids"):
                async for _ in engine.generate("c", None, [10**6], greedy):
                    pass
            assert await client.call_utility(0, "ping") == "pong"
        finally:
            await engine.shutdown()
        assert proc is not None and not proc.is_alive() and proc.exitcode == 0
        if transport == "ipc":  # the socket files' private directory is gone
            assert client.tmpdir is not None and not os.path.exists(client.tmpdir)

    asyncio.run(main())
    values = parse_metrics(metrics.render().decode())
    labels = (("engine", "0"), ("model_name", "m"))
    assert values[("vllm:request_success_total", tuple(sorted(labels + (("finished_reason", "length"),))))] == 1
    assert values[("vllm:request_success_total", tuple(sorted(labels + (("finished_reason", "abort"),))))] == 1


def test_load_balancer_spreads_a_burst_and_takes_snapshots():
    """Between two coordinator snapshots the front end counts what it sent: a burst alternates over idle
    ranks (ties to the lowest); a snapshot of the current epoch replaces the counts, a stale one does not."""
    from types import SimpleNamespace

    from elastic.frontend.load_balancer import LoadBalancer
    from elastic.protocol.from_coordinator import LoadSnapshot

    ranks = [SimpleNamespace(rank=0), SimpleNamespace(rank=1)]
    lb = LoadBalancer(2)
    picks = []
    for _ in range(4):
        engine = lb.pick(ranks)
        lb.sent(engine.rank, 1)
        picks.append(engine.rank)
    assert picks == [0, 1, 0, 1]
    lb.on_snapshot(LoadSnapshot([[0, 9], [0, 1]], wave=0, running=True, epoch=3), epoch=3)
    assert lb.pick(ranks).rank == 1
    lb.on_snapshot(LoadSnapshot([[0, 0], [5, 5]], wave=0, running=True, epoch=2), epoch=3)  # an old layout's: ignored
    assert lb.counts == [[0, 9], [0, 1]]
    lb.reset(3)
    assert lb.counts == [[0, 0]] * 3


def test_engine_steps_metric_counts_the_engines_cumulative_steps():
    """elastic:engine_steps_total{kind}: the engines report cumulative counts in their stats; the primary API
    server adds what is new since the last report, another server of the same port adds nothing, and an
    engine that left takes its series along."""
    from elastic.protocol.from_engine import SchedulerStats

    def steps(metrics: ServerMetrics, kind: str) -> float | None:
        return metrics.registry.get_sample_value("elastic:engine_steps_total",
                                                 {"model_name": "m", "engine": "0", "kind": kind})

    metrics, other = ServerMetrics("m", 256), ServerMetrics("m", 256, primary=False)
    for counts in ({"decode_graph": 3, "mixed_graph": 1, "eager": 0}, {"decode_graph": 7, "mixed_graph": 1, "eager": 2}):
        for m in (metrics, other):
            m.record_scheduler_stats(0, SchedulerStats(1, 0, 0.1, 0, None, counts))
    assert (steps(metrics, "decode_graph"), steps(metrics, "mixed_graph"), steps(metrics, "eager")) == (7, 1, 2)
    assert steps(other, "decode_graph") in (None, 0)
    metrics.remove_engine(0)
    assert steps(metrics, "decode_graph") is None
