"""The OpenAI-compatible server end to end: one real `elastic serve` process (API server + engine core
process) for the whole module, driven with the openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest
from checkpoints import make_checkpoint
from server_fixtures import REPO_ROOT, TEST_SERVER_ARGS, ServerProcess, wait_until

API_KEY = "test-key"
MODEL = "tiny-qwen3"
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Bonjour le monde"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("ckpt")))


@pytest.fixture(scope="module")
def server(checkpoint: str):
    with ServerProcess(checkpoint, *TEST_SERVER_ARGS, "--served-model-name", MODEL, api_key=API_KEY) as srv:
        srv.wait_ready()
        yield srv
        # The shared server must also shut down cleanly: exit 0, no process, no socket file left.
        assert srv.stop() == 0, srv.log()[-3000:]
        assert "Traceback" not in srv.log(), srv.log()
        assert srv.leftover_pids() == []
        assert srv.socket_files() == []


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.openai()


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ---- basics -----------------------------------------------------------------------------------------------
def test_models_health_version(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert server.health() == 200
    assert server.get("/version").json()["version"]
    # The repo's kernels/ directory must not make transformers think hub kernels are installed.
    assert "hub kernels integration is ON" not in server.log()


def test_completion_usage_and_length(server: ServerProcess, client: openai.OpenAI) -> None:
    prompt = PROMPTS[0]
    n_prompt = server.post("/tokenize", json={"prompt": prompt}).json()["count"]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == n_prompt + 12


def test_greedy_matches_offline_llm(server: ServerProcess, client: openai.OpenAI, checkpoint: str) -> None:
    from elastic import LLM, SamplingParams

    llm = LLM(checkpoint, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=64)
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, expected):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=0,
                                        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        choice = out.choices[0]
        assert choice.text == ref.outputs[0].text
        assert [int(t.split(":")[1]) for t in choice.logprobs.tokens] == ref.outputs[0].token_ids
    # Chat goes through the same template as LLM.chat.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)[0]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ref.outputs[0].text
    assert chat.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_token_id_prompts_and_prompt_lists(server: ServerProcess, client: openai.OpenAI) -> None:
    ids = [server.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in PROMPTS[:2]]
    by_text = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    single = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=8, temperature=0)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert single.choices[0].text == by_ids.choices[1].text
    assert by_ids.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_n_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, n=3, temperature=1.0,
                                        seed=seed, extra_body={"ignore_eos": True})
        assert sorted(c.index for c in out.choices) == [0, 1, 2]
        assert out.usage.completion_tokens == 30
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first)) > 1  # the n samples use distinct seeds
    assert sample(99) != first


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0 and token in top and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the most likely
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob == c.top_logprobs[0].logprob for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_echo(server: ServerProcess, client: openai.OpenAI) -> None:
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[2] + plain.choices[0].text


def test_stop_strings_and_stop_token_ids(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = text.index(stop)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.model_extra["stop_reason"] == stop
    # The same through a stream: the held-back text never leaks the stop string.
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=32, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == text[:cut]
    # stop_token_ids: stop at the third generated token.
    ids = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    third = int(ids.choices[0].logprobs.tokens[2].split(":")[1])
    first_hit = [int(t.split(":")[1]) for t in ids.choices[0].logprobs.tokens].index(third)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [third]})
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == first_hit + 1


# ---- streaming --------------------------------------------------------------------------------------------
def test_stream_completion_raw_sse(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True,
            "stop": None, "logprobs": None, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=server.headers(),
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    text_chunks = chunks[:-1]
    assert all(c["usage"]["prompt_tokens"] == usage_chunk["usage"]["prompt_tokens"] for c in text_chunks)
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    full = server.post("/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert streamed == full["choices"][0]["text"]


def test_stream_chat(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_concurrent_streams(server: ServerProcess) -> None:
    num = 20

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.completions.create(model=MODEL, prompt=f"{PROMPTS[i % 3]} {i}", max_tokens=16,
                                                 temperature=0.8, seed=i, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def run() -> list[tuple[str, int]]:
        async with server.async_openai() as client:
            return await asyncio.gather(*(one(client, i) for i in range(num)))

    results = asyncio.run(run())
    assert [tokens for _, tokens in results] == [16] * num
    assert all(text for text, _ in results)
    wait_until(lambda: server.metric("vllm:num_requests_running") == 0, 10, "running count back to 0")


# ---- disconnects abort --------------------------------------------------------------------------------
def _wait_running(server: ServerProcess, count: int) -> None:
    wait_until(lambda: server.metric("vllm:num_requests_running", model_name=MODEL, engine="0") == count, 30,
               f"{count} running request(s) in /metrics")


def test_stream_disconnect_aborts(server: ServerProcess) -> None:
    aborted_before = _abort_count(server)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=server.headers(),
                      timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        _wait_running(server, 1)
    # Leaving the block closed the connection mid-stream: the engine must drop the request.
    _wait_running(server, 0)
    wait_until(lambda: server.metric("vllm:kv_cache_usage_perc", engine="0") == 0.0, 10, "KV blocks freed")
    wait_until(lambda: _abort_count(server) == aborted_before + 1, 10, "the abort to be counted")


def test_non_stream_disconnect_aborts(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 240, "ignore_eos": True}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers(), timeout=60) as http:
            task = asyncio.ensure_future(http.post("/v1/completions", json=body))
            await asyncio.to_thread(_wait_running, server, 1)
            task.cancel()  # closes the connection before the response
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    _wait_running(server, 0)


def _abort_count(server: ServerProcess) -> float:
    try:
        return server.metric("vllm:request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0


# ---- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [10**7]]}, "prompt"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
])
def test_bad_completion_parameters_are_400(server: ServerProcess, body: dict, param: str) -> None:
    error = error_of(server.post("/v1/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param and error["type"] == "BadRequestError" and error["code"] == 400


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -5}, "max_tokens"),
])
def test_bad_chat_parameters_are_400(server: ServerProcess, body: dict, param: str) -> None:
    error = error_of(server.post("/v1/chat/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == param


def test_malformed_json_is_400(server: ServerProcess) -> None:
    for payload in (b'{"model": "tiny-qwen3", "prompt": ', b"[1, 2]", b"not json"):
        r = server.post("/v1/completions", content=payload, headers={"Content-Type": "application/json"})
        error_of(r, 400)


def test_unknown_model_is_404(server: ServerProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    error = error_of(server.post("/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}), 404)
    assert error["param"] == "model"


def test_context_length_is_400(server: ServerProcess, client: openai.OpenAI) -> None:
    long_prompt = list(range(100, 300))  # 200 tokens
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=100)
    error_of(server.post("/v1/completions", json={"model": MODEL, "prompt": list(range(300)), "max_tokens": 1}),
             400)
    # Just fitting is fine.
    out = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=56, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 56


def test_api_key(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    error_of(httpx.post(server.base_url + "/v1/completions", json=body), 401)
    error_of(httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.get(server.base_url + f"/v1/models/{MODEL}"), 401)
    # Probes and scrapers need no key.
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_request_chat_template_needs_trust(server: ServerProcess) -> None:
    """Without --trust-request-chat-template a request cannot bring its own template (it is code)."""
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"chat_template": "{{ 'x' }}"}, {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}):
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, **extra}
        error = error_of(server.post("/v1/chat/completions", json=body), 400)
        assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]


def test_unknown_route_is_openai_style_404(server: ServerProcess) -> None:
    error_of(server.get("/v1/nothing-here"), 404)


def test_engine_survives_bad_input(server: ServerProcess, client: openai.OpenAI) -> None:
    for body in ({"prompt": [5, -1]}, {"prompt": "x", "logit_bias": {"999999999": 5}},
                 {"prompt": "x", "stop_token_ids": [10**9]}):
        error_of(server.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, **body}), 400)
    assert server.health() == 200
    assert client.completions.create(model=MODEL, prompt="still alive?", max_tokens=3).usage.completion_tokens


# ---- tokenizer endpoints, metrics -------------------------------------------------------------------------
def test_tokenize_detokenize(server: ServerProcess) -> None:
    tok = server.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 256
    assert server.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == "Hello world"
    chat = server.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tok["count"] - 2
    error_of(server.post("/detokenize", json={"tokens": [10**9]}), 400)
    error_of(server.post("/tokenize", json={"prompt": "x", "model": "nope"}), 404)


def test_metrics_have_vllm_names_and_labels(server: ServerProcess, client: openai.OpenAI) -> None:
    before = server.metrics()
    client.completions.create(model=MODEL, prompt="count me", max_tokens=7, extra_body={"ignore_eos": True})
    after = server.metrics()
    labels = (("engine", "0"), ("model_name", MODEL))

    def delta(name: str, extra: tuple = ()) -> float:
        key = (name, tuple(sorted(labels + extra)))
        return after[key] - before.get(key, 0.0)

    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (gauge, labels) in after
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:prompt_tokens_total") > 0
    assert delta("vllm:request_success_total", (("finished_reason", "length"),)) == 1
    for hist in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds"):
        assert delta(f"{hist}_count") == 1, hist
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    # The engine's forwards by kind (eager on the CPU: no CUDA graphs), from the stats of its next batches.
    steps = ("elastic:engine_steps_total", tuple(sorted(labels + (("kind", "eager"),))))
    wait_until(lambda: server.metrics().get(steps, 0.0) - before.get(steps, 0.0) >= 7, 10, "the request's 7 steps")


def test_cli_help() -> None:
    for args in (["--help"], ["serve", "--help"]):
        out = subprocess.run([sys.executable, "-m", "elastic", *args], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "serve" in out.stdout
    assert "--max-num-batched-tokens" in out.stdout and "--api-key" in out.stdout
