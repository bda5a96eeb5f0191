"""The autoscaler loop against a fake server (httpx.MockTransport) and a fake clock: what it sends to
POST /scale, how it retries, waits and backs off. No process, no socket, no sleep."""
from __future__ import annotations

import json
from typing import Any, Callable

import httpx
import pytest

from elastic.autoscale.config import ControllerConfig
from elastic.autoscale.controller import Autoscaler, AutoscaleAuthError, ServerClient
from elastic.autoscale.policy import PolicyConfig

POLICY = PolicyConfig(min_size=1, max_size=3, up_sustain_s=2, up_cooldown_s=2, down_quiet_s=3, down_cooldown_s=3)
FAST = ControllerConfig(interval_s=0.001, retry_delay_s=0.001, failure_backoff_s=10)

Answer = Callable[[dict[str, Any]], httpx.Response]


class FakeServer:
    """GET /health, /metrics, /scale and POST /scale; POST answers come from `answers` (then: succeed)."""

    def __init__(self, size: int = 1) -> None:
        self.size, self.state = size, "idle"
        self.waiting = self.running = 0
        self.states: list[str] = []  # GET /scale's next states (then self.state)
        self.answers: list[Answer | Exception] = []
        self.posts: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/metrics":
            return httpx.Response(200, text=self._metrics())
        if request.method == "GET":
            state = self.states.pop(0) if self.states else self.state
            return httpx.Response(200, json={"state": state, "data_parallel_size": self.size})
        body = json.loads(request.content)
        self.posts.append(body)
        self.auth.append(request.headers.get("authorization"))
        answer = self.answers.pop(0) if self.answers else succeed
        if isinstance(answer, Exception):
            raise answer
        return answer(body)

    def _metrics(self) -> str:
        lines = ["# TYPE vllm:num_requests_waiting gauge", "# TYPE vllm:num_requests_running gauge"]
        for engine in range(self.size):  # the load spread evenly, as the router would
            lines.append(f'vllm:num_requests_waiting{{engine="{engine}",model_name="m"}} {self.waiting / self.size}')
            lines.append(f'vllm:num_requests_running{{engine="{engine}",model_name="m"}} {self.running / self.size}')
        return "\n".join(lines) + "\n"


def succeed(body: dict[str, Any]) -> httpx.Response:
    return httpx.Response(200, json={"operation_id": body["operation_id"], "result": "succeeded", "from": 0,
                                     "to": body["new_data_parallel_size"], "prepare_s": 1.0, "blocking_s": 0.01,
                                     "total_s": 1.1, "joined": False})


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(server: FakeServer, config: ControllerConfig = FAST, **kw: Any) -> tuple[Autoscaler, Clock]:
    clock = Clock()
    http = httpx.Client(transport=httpx.MockTransport(server.handle))
    client = ServerClient("http://fake", "admin", http=http)
    return Autoscaler(client, POLICY, config, clock=clock, **kw), clock


def ticks(scaler: Autoscaler, clock: Clock, seconds: int, apply: FakeServer | None = None) -> None:
    """One tick per fake second; a succeeded POST changes the fake server's size."""
    for _ in range(seconds):
        before = len(scaler.events)
        scaler.tick()
        if apply is not None and len(scaler.events) > before and scaler.events[-1].outcome == "succeeded":
            apply.size = scaler.events[-1].decision.target
        clock.t += 1


def test_scales_up_on_queueing_then_down_when_quiet() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    scaler, clock = make(server)
    ticks(scaler, clock, 4, apply=server)
    assert [(p["new_data_parallel_size"]) for p in server.posts] == [2]
    assert server.auth == ["Bearer admin"]
    server.waiting = server.running = 0
    ticks(scaler, clock, 6, apply=server)
    assert [p["new_data_parallel_size"] for p in server.posts] == [2, 1]
    ids = [p["operation_id"] for p in server.posts]
    assert len(set(ids)) == 2 and all(i.startswith(f"autoscale-{scaler.run_id}-") for i in ids)
    assert [e.outcome for e in scaler.events] == ["succeeded", "succeeded"]


def test_a_lost_answer_is_retried_with_the_same_operation_id() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    server.answers = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), succeed]
    scaler, clock = make(server)
    ticks(scaler, clock, 3)
    assert len(server.posts) == 3 and len({p["operation_id"] for p in server.posts}) == 1
    event = scaler.events[-1]
    assert (event.outcome, event.attempts) == ("succeeded", 3)


def test_conflict_waits_for_the_other_operation_then_decides_again() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    conflict = httpx.Response(409, json={"error": {"message": "operation x (1 -> 3 ranks) is preparing"}})
    server.answers = [lambda body: conflict]
    scaler, clock = make(server)
    ticks(scaler, clock, 2)  # sustained from the 3rd tick on
    server.states = ["idle", "preparing", "preparing"]  # the 3rd tick's own scrape, then wait_idle polls
    ticks(scaler, clock, 1)
    assert [e.outcome for e in scaler.events] == ["conflict"]
    assert not server.states, "waited until GET /scale said idle"
    ticks(scaler, clock, 1)  # fresh metrics, a new decision, a new operation id
    assert len(server.posts) == 2 and server.posts[0]["operation_id"] != server.posts[1]["operation_id"]


def test_no_new_scale_while_backing_off_after_a_rollback() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    rolled_back = httpx.Response(200, json={"result": "rolled_back", "error": "rank 1 died while starting"})
    server.answers = [lambda body: rolled_back]
    scaler, clock = make(server)
    ticks(scaler, clock, 8)
    assert len(server.posts) == 1 and scaler.events[0].outcome == "rolled_back"
    clock.t += FAST.failure_backoff_s
    ticks(scaler, clock, 1)
    assert len(server.posts) == 2


def test_holds_while_the_server_is_scaling() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    server.state = "committing"  # someone else's operation
    scaler, clock = make(server)
    ticks(scaler, clock, 5)
    assert not server.posts and {d.code for _, d in scaler.decisions} == {"scaling"}


def test_a_refused_key_stops_the_autoscaler() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    server.answers = [lambda body: httpx.Response(401, json={"error": {"message": "bad key"}})]
    scaler, clock = make(server)
    with pytest.raises(AutoscaleAuthError, match="admin-api-key"):
        ticks(scaler, clock, 3)


def test_dry_run_prints_decisions_and_never_posts() -> None:
    server = FakeServer()
    server.waiting, server.running = 8, 4
    lines: list[str] = []
    scaler, clock = make(server, ControllerConfig(dry_run=True, interval_s=0.001), echo=lines.append)
    ticks(scaler, clock, 4)
    assert not server.posts and len(lines) == 4
    assert "would scale: up 1 -> 2 [queueing]" in lines[-1]


def test_cli_flags_build_the_configs() -> None:
    from elastic.autoscale.cli import build_configs
    from elastic.entrypoints.cli import make_parser

    args = make_parser().parse_args(["autoscale", "--min", "1", "--max", "4", "--up-sustain", "5",
                                     "--ttft-target", "0.5", "--interval", "2", "--dry-run"])
    policy, controller = build_configs(args)
    assert (policy.min_size, policy.max_size, policy.up_sustain_s, policy.ttft_target_s) == (1, 4, 5.0, 0.5)
    assert (controller.interval_s, controller.dry_run) == (2.0, True)
    with pytest.raises(SystemExit):
        make_parser().parse_args(["autoscale", "--max", "4"])  # --min is required


def test_building_the_cli_does_not_import_httpx() -> None:
    """httpx is not a core dependency: `elastic serve` must parse its flags without it."""
    import subprocess
    import sys

    code = "import sys; from elastic.entrypoints.cli import make_parser; make_parser(); print('httpx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
