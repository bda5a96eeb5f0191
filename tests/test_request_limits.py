"""Issue #8, unit level: request bounds (schema, SamplingParams, engine decode), the chat-template sandbox,
prompt tokenization limits, the HTTP guards, and the engine failing one request alone."""
from __future__ import annotations

import time

import msgspec
import pytest
from conftest import random_prompts
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from elastic import LLM, SamplingParams
from elastic.engine.core import EngineCore
from elastic.entrypoints import middleware
from elastic.entrypoints.openai.offload import _parse
from elastic.entrypoints.openai.protocol import APIError, ChatCompletionRequest, CompletionRequest
from elastic.frontend.chat_template import ChatTemplateError, ChatTemplateRenderer
from elastic.frontend.text_encoder import TextEncoder
from elastic.protocol.to_engine import EngineCoreInput, EngineCoreRequest

# ---- bounds ---------------------------------------------------------------------------------------------
POISON_SAMPLING = [
    (dict(top_k=2**63), "top_k"), (dict(n=2**63), "n"), (dict(n=100_000), "n"), (dict(seed=-1), "seed"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(max_tokens=2**64), "max_tokens"), (dict(top_k=1.5), "top_k"),
    (dict(logit_bias={5: float("nan")}), "logit_bias"), (dict(logit_bias={2**63: 1.0}), "logit_bias"),
    (dict(stop=["\ud800"]), "stop"), (dict(stop=["x"] * 65), "stop"), (dict(stop=["x" * 1025]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(min_tokens=2**63), "min_tokens"),
]


@pytest.mark.parametrize("kwargs, field", POISON_SAMPLING)
def test_sampling_params_refuse_unsafe_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        SamplingParams(**kwargs)


def test_engine_decode_enforces_the_same_bounds() -> None:
    """The engine core never trusts its socket: SamplingParams' checks run on decode too."""
    decoder = msgspec.msgpack.Decoder(EngineCoreInput)
    bad = msgspec.msgpack.encode(["EngineCoreRequest", "r1", [1, 2], {"top_k": 2**63}])
    with pytest.raises(msgspec.ValidationError, match="top_k"):
        decoder.decode(bad)
    assert SamplingParams(min_p=-0.0, top_p=1e-320).top_p == 1e-320  # odd but valid


@pytest.mark.parametrize("model, body, param", [
    (CompletionRequest, b'{"prompt": "a", "top_k": 9223372036854775808}', "top_k"),
    (CompletionRequest, b'{"prompt": "a", "truncate_prompt_tokens": 9223372036854775808}', "truncate_prompt_tokens"),
    (CompletionRequest, b'{"prompt": "a", "n": 100000}', "n"),
    (CompletionRequest, b'{"prompt": "a", "temperature": Infinity}', "temperature"),
    (CompletionRequest, b'{"prompt": "a", "logit_bias": {"5": NaN}}', "logit_bias"),
    (CompletionRequest, b'{"prompt": "a", "stream": "yes"}', "stream"),
    (CompletionRequest, b'{"prompt": ["a", 1]}', "prompt"),
    (CompletionRequest, b'{"prompt": "a", "stop": ["x", ""], "stop_token_ids": [-3]}', "stop_token_ids"),
    (CompletionRequest, b'{"prompt": [[1]], "logprobs": 21}', "logprobs"),
    (ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99}', "top_logprobs"),
    (CompletionRequest, b'{"prompt": "\\ud800"}', None),  # a lone surrogate is not text
])
def test_schema_refuses_with_a_param(model: type, body: bytes, param: str | None) -> None:
    with pytest.raises(APIError) as info:
        _parse(model, body)
    assert info.value.status_code == 400 and info.value.param == param, info.value.message


# ---- chat templates --------------------------------------------------------------------------------------
RICH_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}"
    "{%- endfor -%}{{ bos_token or '' }}{% if ns.system %}[SYS]{{ ns.system | trim }}[/SYS]{% endif %}"
    "{%- for m in messages if m['role'] != 'system' -%}{{ loop.index0 }}:{{ m['role'] | upper }}:"
    "{{ m['content'] | tojson }}{% if not loop.last %}\n{% endif %}{%- endfor -%}"
    "{%- if add_generation_prompt %}\nASSISTANT:{% endif %}{{ extra | default('') }}")
EVIL_TEMPLATES = {
    "string times huge": "{{ 'x' * 10**10 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested string loops": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "ljust": "{{ 'x'.ljust(10**9) }}",
    "format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%1000000000s' % 'a' }}",
    "filter width": "{{ 'x' | center(1000000000) }}",
    "huge power": "{{ 2 ** 10000000 }}",
    "huge output": "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "dunder": "{{ messages.__class__.__mro__ }}",
    "raise": "{{ raise_exception('no') }}",
    "syntax": "{% for %}",
}


def _renderer(template: str | None = None, timeout_s: float = 0.5) -> ChatTemplateRenderer:
    return ChatTemplateRenderer(template, {"bos_token": "<s>", "eos_token": "</s>"}, max_chars=1 << 20,
                                timeout_s=timeout_s)


@pytest.mark.parametrize("name", sorted(EVIL_TEMPLATES))
def test_templates_are_stopped_by_limits(name: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChatTemplateError):
        _renderer().render([{"role": "user", "content": "hi"}], template=EVIL_TEMPLATES[name])
    assert time.monotonic() - started < 5.0


def test_renderer_matches_transformers(checkpoint_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir("qwen3_moe")))
    chats = [[{"role": "system", "content": " Be brief. "}, {"role": "user", "content": 'Hi "there"\nok'}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]]
    for template in (tokenizer.get_chat_template(), RICH_TEMPLATE):
        ours = ChatTemplateRenderer(template, tokenizer.special_tokens_map, 1 << 20)
        for chat in chats:
            for gen, cont in ((True, False), (False, False), (False, True)):
                try:
                    expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen,
                                                             continue_final_message=cont, chat_template=template,
                                                             extra="!")
                except ValueError:  # e.g. the template escapes the message it should continue
                    with pytest.raises(ChatTemplateError):
                        ours.render(chat, add_generation_prompt=gen, continue_final_message=cont,
                                    kwargs={"extra": "!"})
                    continue
                got = ours.render(chat, add_generation_prompt=gen, continue_final_message=cont,
                                  kwargs={"extra": "!"})
                assert got == expected


# ---- tokenization ----------------------------------------------------------------------------------------
def test_text_encoder_refuses_what_cannot_fit_without_tokenizing(checkpoint_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir("qwen3_moe")))
    encoder = TextEncoder(tokenizer, max_model_len=256)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    assert encoder.encode(text) == tokenizer.encode(text)
    started = time.monotonic()
    with pytest.raises(ValueError, match="more than 256 tokens"):
        encoder.encode("word " * 6_000_000)  # 30 MB: tokenizing it would take minutes
    assert time.monotonic() - started < 1.0
    long = "tail words of a long prompt " * 50_000
    tail = encoder.encode(long, keep_last=40)
    assert len(tail) == 40 and tail == tokenizer.encode(long[-5000:])[-40:]


# ---- HTTP guards -----------------------------------------------------------------------------------------
def _guarded_app() -> FastAPI:
    app = FastAPI()
    middleware.install(app, api_key="k", max_body_bytes=2048)

    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):  # type: ignore[no-untyped-def]
        from fastapi.responses import JSONResponse

        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.post("/v1/echo")
    async def echo(raw: Request) -> dict:
        return {"size": len(await raw.body()), "id": middleware.current_request_id()}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        return {"id": name}

    @app.post("/admin/noop", dependencies=[Depends(middleware.admin_guard("root"))])
    async def admin() -> dict:
        return {"ok": True}

    @app.post("/admin/off", dependencies=[Depends(middleware.admin_guard(None))])
    async def admin_off() -> dict:
        return {"ok": True}

    return app


def test_http_guards() -> None:
    client = TestClient(_guarded_app())
    key = {"Authorization": "Bearer k"}
    assert client.get("/v1/models/x").status_code == 401  # every /v1 route, models included
    ok = client.post("/v1/echo", content=b"x" * 100, headers={**key, "X-Request-Id": "abc-1"})
    assert ok.json() == {"size": 100, "id": "abc-1"} and ok.headers["x-request-id"] == "abc-1"
    fresh = client.post("/v1/echo", content=b"", headers={**key, "X-Request-Id": "bad id\n"})
    assert fresh.headers["x-request-id"] != "bad id" and len(fresh.headers["x-request-id"]) == 32
    assert client.post("/v1/echo", content=b"x" * 4096, headers=key).status_code == 413  # Content-Length
    chunks = (b"x" * 1000 for _ in range(4))  # no Content-Length: counted while streaming
    too_big = client.post("/v1/echo", content=chunks, headers=key)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == 413
    assert client.post("/admin/noop").status_code == 401
    assert client.post("/admin/noop", headers=key).status_code == 401  # the /v1 key is not the admin key
    assert client.post("/admin/noop", headers={"Authorization": "Bearer root"}).json() == {"ok": True}
    assert client.post("/admin/off", headers={"Authorization": "Bearer root"}).status_code == 403


# ---- the engine fails one request, not the step ----------------------------------------------------------
@pytest.fixture(scope="module")
def engine(checkpoint_dir) -> EngineCore:
    return LLM(str(checkpoint_dir("qwen3_moe")), max_model_len=64).engine


def _run(engine: EngineCore, ids: list[str], poison) -> dict:  # type: ignore[no-untyped-def]
    for rid, prompt in zip(ids, random_prompts((5, 7, 9))):
        engine.add_request(EngineCoreRequest(rid, prompt, SamplingParams(temperature=0.8, seed=1, max_tokens=6,
                                                                         ignore_eos=True)))
    poison(engine.scheduler.requests[ids[1]])  # past validation: what only a bug could do
    results: dict = {rid: [] for rid in ids}
    for _ in range(50):
        for out in engine.step():
            results[out.request_id].append(out)
        if not engine.has_unfinished_requests():
            break
    return results


@pytest.mark.parametrize("where, poison", [
    ("sampling", lambda req: setattr(req.params, "top_k", 2**63)),  # the issue's overflow, inside the sampler
    ("sampling", lambda req: setattr(req.params, "temperature", float("nan"))),
    ("inputs", lambda req: req.all_token_ids.__setitem__(2, 10**9)),  # an out-of-vocab token reaching the model
])
def test_a_broken_request_fails_alone(engine: EngineCore, where: str, poison) -> None:  # type: ignore[no-untyped-def]
    ids = [f"{where}-{i}-{id(poison)}" for i in range(3)]
    results = _run(engine, ids, poison)
    bad = results[ids[1]]
    assert bad[-1].finish_reason == "error" and bad[-1].error and "Traceback" not in bad[-1].error
    for rid in (ids[0], ids[2]):
        assert sum(len(o.new_token_ids) for o in results[rid]) == 6 and results[rid][-1].finish_reason == "length"
    assert not engine.has_unfinished_requests()
