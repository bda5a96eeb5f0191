"""`elastic autoscale` against a real server on loopback: 1 -> 2 ranks under queueing load, 2 -> 1 once idle.

The server runs at most 2 requests per rank (--max-num-seqs 2) and 6 clients keep it busy, so requests queue;
the autoscaler's durations are shrunk to seconds. First a `--dry-run` autoscaler alone (no admin key) must
decide to scale while the server stays at 1 rank; then the real one scales. /health is probed throughout: it
must stay 200 across both scales (what a readiness probe sees).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from server_fixtures import REPO_ROOT, TEST_SERVER_ARGS, ServerProcess, wait_until

ADMIN_KEY = "admin-key"
SERVER_ARGS = (*TEST_SERVER_ARGS, "--max-num-seqs", "2", "--admin-api-key", ADMIN_KEY, "--served-model-name", "m",
               "--scale-phase-timeout", "60")
ENV = {"OMP_NUM_THREADS": "1"}  # two engines, the API server, the clients and an autoscaler on 2 cores
FAST_POLICY = ("--min", "1", "--max", "2", "--interval", "0.3", "--up-sustain", "1.5", "--up-cooldown", "1",
               "--down-quiet", "1.5", "--down-cooldown", "2", "--log-level", "INFO")


class Autoscaler:
    """`elastic autoscale` as a subprocess in its own process group (killed whatever happens)."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ELASTIC_ADMIN_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "elastic", "autoscale", "--url", url, *FAST_POLICY, *args],
                                     cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


class Load:
    """`clients` threads sending completions back to back until stopped; /health probed meanwhile."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.stopping, self.closing = url, threading.Event(), threading.Event()
        self.errors: list[str] = []
        self.health: list[int | str] = []
        self.clients = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        self.prober = threading.Thread(target=self._probe, daemon=True)
        for t in [*self.clients, self.prober]:
            t.start()

    def _client(self, i: int) -> None:
        body = {"model": "m", "prompt": [11 + i] * 16, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stopping.is_set():
                try:
                    r = http.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        self.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def _probe(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.closing.wait(0.2):
                try:
                    self.health.append(http.get("/health").status_code)
                except httpx.HTTPError as e:
                    self.health.append(repr(e))

    def stop_clients(self) -> None:
        """Clients finish their request in flight and stop; the probe goes on until `close`."""
        self.stopping.set()
        for t in self.clients:
            t.join(60)

    def close(self) -> None:
        self.stop_clients()
        self.closing.set()
        self.prober.join(60)


def test_autoscale_scales_up_under_load_and_down_when_idle(checkpoint_dir, tmp_path: Path) -> None:
    server = ServerProcess(checkpoint_dir("qwen3_moe"), *SERVER_ARGS, env=ENV)
    scalers: list[Autoscaler] = []
    load: Load | None = None
    size = lambda: server.get("/scale").json()["data_parallel_size"]  # noqa: E731
    try:
        # The dry run starts while the server loads (it holds meanwhile: no metrics) and runs alone under load:
        # it must decide to scale, and the server must not change.
        dry = Autoscaler(server.base_url, tmp_path / "dry.log", "--dry-run")
        scalers.append(dry)
        server.wait_ready()
        load = Load(server.base_url, clients=6)
        wait_until(lambda: "would scale: up 1 -> 2" in dry.log(), 60, f"the dry run's decision:\n{dry.log()[-2000:]}")
        assert dry.stop() == 0, dry.log()[-2000:]
        assert size() == 1 and server.metric("elastic:scale_operations_total") == 0
        live = Autoscaler(server.base_url, tmp_path / "live.log", "--admin-api-key", ADMIN_KEY)
        scalers.append(live)
        wait_until(lambda: size() == 2, 120, f"a scale-up; autoscaler log:\n{live.log()[-3000:]}", interval=0.2)
        load.stop_clients()
        wait_until(lambda: size() == 1, 60, f"a scale-down; autoscaler log:\n{live.log()[-3000:]}", interval=0.2)
        assert live.stop() == 0, live.log()[-2000:]
        log = live.log()
        assert "scaling 1 -> 2 ranks (operation autoscale-" in log and "[queueing]: hot in" in log, log[-3000:]
        assert "scaling 2 -> 1 ranks (operation autoscale-" in log and "[quiet]" in log, log[-3000:]
        assert "succeeded: 1 -> 2 ranks" in log and "succeeded: 2 -> 1 ranks" in log, log[-3000:]
        for direction in ("up", "down"):  # exactly one operation each way
            assert server.metric("elastic:scale_operations_total", direction=direction, result="succeeded") == 1
        load.close()
        assert not load.errors, load.errors[:5]
        assert load.health and set(load.health) == {200}, f"/health during the scales: {set(load.health)}"
    finally:
        if load is not None:
            load.close()
        for scaler in scalers:
            scaler.close()
        server.close()
