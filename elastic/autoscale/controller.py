"""The autoscaler loop: scrape, decide, call POST /scale, one operation at a time.

Safety rules, each for a reason:
- One tick runs at a time and waits for its POST /scale to finish, so this autoscaler never overlaps two
  operations; a scale started by someone else shows as `state != idle` in GET /scale (the policy holds) or as
  a 409 (we wait until the server is idle, then decide again on fresh metrics: the old decision is stale).
- Every operation has its own id (`autoscale-<run>-<n>`); after a lost connection or a timeout the same call is
  repeated with the same id, which the server treats as the same operation (it joins it, or returns its
  recorded outcome), so a retry can never scale twice.
- After a scale that rolled back, failed or was refused, no new one starts for `failure_backoff_s`: the
  server said no, and asking again at once would only repeat it.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from elastic.autoscale.config import ControllerConfig
from elastic.autoscale.policy import Decision, PolicyConfig, decide
from elastic.autoscale.signals import Sample, failed_sample, parse_sample

logger = logging.getLogger("elastic.autoscale")


class AutoscaleAuthError(RuntimeError):
    """The server refused the admin key (401/403): retrying cannot help."""


@dataclass(frozen=True)
class ScaleEvent:
    """One operation as the autoscaler saw it (for logs, benchmarks and tests)."""

    t_start: float
    t_end: float
    decision: Decision
    operation_id: str
    outcome: str  # succeeded, noop, rolled_back, failed, refused, conflict, unavailable, lost, stopped
    attempts: int
    body: dict[str, Any]


class ServerClient:
    """The server routes the autoscaler uses: /metrics, GET /scale and /health (open), POST /scale (admin)."""

    def __init__(self, url: str, admin_api_key: str | None, scrape_timeout_s: float = 10.0,
                 http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_api_key}"} if admin_api_key else {}
        self.scrape_timeout_s = scrape_timeout_s
        self.http = http or httpx.Client()

    def scrape(self, t: float, last_size: int) -> Sample:
        try:
            health = self.http.get(self.url + "/health", timeout=self.scrape_timeout_s).status_code == 200
            metrics = self.http.get(self.url + "/metrics", timeout=self.scrape_timeout_s)
            metrics.raise_for_status()
            return parse_sample(t, metrics.text, self.status(), health)
        except (httpx.HTTPError, ValueError) as e:  # ValueError: a body that does not parse
            logger.warning("scrape of %s failed: %s", self.url, e)
            return failed_sample(t, last_size)

    def status(self) -> dict[str, Any] | None:
        """GET /scale, or None (a server without the route, or an odd answer)."""
        r = self.http.get(self.url + "/scale", timeout=self.scrape_timeout_s)
        if r.status_code != 200:
            return None
        body = r.json()
        return body if isinstance(body, dict) else None

    def post_scale(self, size: int, operation_id: str, drain_timeout_s: float | None,
                   timeout_s: float) -> httpx.Response:
        body: dict[str, Any] = {"new_data_parallel_size": size, "operation_id": operation_id}
        if drain_timeout_s is not None:
            body["drain_timeout"] = drain_timeout_s
        return self.http.post(self.url + "/scale", json=body, headers=self.headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()


class Autoscaler:
    def __init__(self, client: ServerClient, policy: PolicyConfig, config: ControllerConfig = ControllerConfig(),
                 clock: Callable[[], float] = time.monotonic, stop: threading.Event | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.client, self.policy, self.config, self.clock = client, policy, config, clock
        self.stop = stop or threading.Event()
        self.echo = echo  # --dry-run: every decision is printed here
        self.window: deque[Sample] = deque()
        self.decisions: list[tuple[float, Decision]] = []  # every tick's, for benchmarks and tests
        self.events: list[ScaleEvent] = []
        self.run_id = uuid.uuid4().hex[:8]
        self._seq = 0
        self._backoff_until = -float("inf")
        self._last_code = ""

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> None:
        """Tick every interval until `stop` is set (a tick that scales takes as long as the scale)."""
        logger.info("autoscaling %s between %d and %d ranks%s", self.client.url, self.policy.min_size,
                    self.policy.max_size, " (dry run: deciding only)" if self.config.dry_run else "")
        while not self.stop.is_set():
            started = self.clock()
            self.tick()
            self.stop.wait(max(0.0, self.config.interval_s - (self.clock() - started)))

    def tick(self) -> Decision:
        now = self.clock()
        last_size = self.window[-1].dp_size if self.window else 0
        self.window.append(self.client.scrape(now, last_size))
        while self.window and self.window[0].t < now - self.policy.window_s:
            self.window.popleft()
        decision = decide(self.window, self.policy)
        self.decisions.append((now, decision))
        self._report(decision)
        if decision.scales and not self.config.dry_run:
            if now < self._backoff_until:
                logger.info("%s; not yet: backing off for %.0fs after the last refused or failed scale", decision,
                            self._backoff_until - now)
            else:
                self.execute(decision)  # logs the decision with its operation id
        return decision

    def _report(self, decision: Decision) -> None:
        if self.echo is not None:
            prefix = "would scale: " if decision.scales else ""
            self.echo(f"{time.strftime('%H:%M:%S')} {prefix}{decision}")
        elif not decision.scales:  # a scale is logged by tick(), with what becomes of it
            changed = decision.code != self._last_code  # a hold is logged when its reason changes, not every tick
            logger.log(logging.INFO if changed else logging.DEBUG, "%s", decision)
        self._last_code = decision.code

    # ---- one operation --------------------------------------------------------------------------------------
    def execute(self, decision: Decision) -> ScaleEvent:
        self._seq += 1
        op_id = f"autoscale-{self.run_id}-{self._seq}"
        start = self.clock()
        logger.info("scaling %d -> %d ranks (operation %s) [%s]: %s", decision.size, decision.target, op_id,
                    decision.code, decision.reason)
        attempts, delay = 0, self.config.retry_delay_s
        outcome, body = "stopped", {}
        while not self.stop.is_set():
            attempts += 1
            try:
                response = self.client.post_scale(decision.target, op_id, self.config.drain_timeout_s,
                                                  self.config.scale_timeout_s)
            except httpx.TransportError as e:  # connection lost or timed out: the operation may be running
                if self.clock() - start > self.config.retry_s:
                    logger.error("operation %s: no answer for %.0fs (%s); giving up", op_id, self.config.retry_s, e)
                    outcome = "lost"
                    self._back_off()
                    break
                logger.warning("operation %s: %s; retrying with the same operation id in %.0fs", op_id, e, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            outcome, body = self._outcome(op_id, response)
            break
        event = ScaleEvent(start, self.clock(), decision, op_id, outcome, attempts, body)
        self.events.append(event)
        return event

    def _outcome(self, op_id: str, response: httpx.Response) -> tuple[str, dict[str, Any]]:
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        body = body if isinstance(body, dict) else {"body": body}
        code = response.status_code
        message = _error_message(body)
        if code in (401, 403):
            raise AutoscaleAuthError(f"POST /scale answered {code}: {message} (check --admin-api-key)")
        if code == 409:  # another operation (not ours: ours would be joined) runs
            logger.info("operation %s: %s; waiting for it, then deciding again", op_id, message)
            self.wait_idle()
            return "conflict", body
        if code == 503:  # starting, shutting down, or an engine died: the next ticks hold on /health
            logger.warning("operation %s: server unavailable: %s", op_id, message)
            return "unavailable", body
        if code == 200 and body.get("result") in ("succeeded", "noop"):
            logger.info("operation %s %s: %s -> %s ranks, prepare %.2fs, blocking %.3fs, total %.2fs%s", op_id,
                        body["result"], body.get("from"), body.get("to"), body.get("prepare_s", 0),
                        body.get("blocking_s", 0), body.get("total_s", 0), " (joined)" if body.get("joined") else "")
            return body["result"], body
        outcome = body.get("result") or ("refused" if code < 500 else "failed")
        logger.error("operation %s %s (HTTP %d): %s; no new scale for %.0fs", op_id, outcome, code, message,
                     self.config.failure_backoff_s)
        self._back_off()
        return outcome, body

    def _back_off(self) -> None:
        self._backoff_until = self.clock() + self.config.failure_backoff_s

    def wait_idle(self) -> None:
        """Until GET /scale says idle (or the stop event, or a scale's worth of time)."""
        deadline = self.clock() + self.config.scale_timeout_s
        while not self.stop.is_set() and self.clock() < deadline:
            try:
                status = self.client.status()
            except httpx.HTTPError:
                status = None
            if status is not None and status.get("state") == "idle":
                return
            self.stop.wait(min(self.config.interval_s, 2.0))


def _error_message(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error) if error is not None else str(body)[:300]
