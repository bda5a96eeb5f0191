"""A real `elastic serve` process for tests (a helper module, not a test file).

Each server gets a free loopback port, its own TMPDIR (so its ipc socket files can be checked), and a
log file. `close()` kills the whole process group, so nothing outlives a test even when it fails. Waits
poll a condition with a deadline; nothing sleeps its way to green.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")

# What every test server runs with: the tiny checkpoints are fp32, and short contexts keep the KV cache small.
TEST_SERVER_ARGS = ("--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "64")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def process_group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class ServerProcess:
    def __init__(self, model: str | Path | None, *args: str, api_key: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.tmpdir = Path(tempfile.mkdtemp(prefix="el-"))  # short: ipc paths must stay under ~100 bytes
        self.sockdir = self.tmpdir / "t"
        self.sockdir.mkdir()
        self.log_path = self.tmpdir / "server.log"
        cmd = [sys.executable, "-m", "elastic", "serve"] + ([str(model)] if model is not None else [])
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), *args]
        # With several API servers on one port, /health answers from whichever the kernel picks: ready means
        # that every one of them said so in the log.
        self.api_servers = int(args[list(args).index("--api-server-count") + 1]) if "--api-server-count" in args else 1
        if api_key:
            cmd += ["--api-key", api_key]
        full_env = dict(os.environ)
        full_env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                        TMPDIR=str(self.sockdir), PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self._log = open(self.log_path, "wb")
        # Own session: the server, its engine and anything they start share one process group to check/kill.
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pgid = self.proc.pid

    # ---- access -----------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers(), timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(self.base_url + path, headers={**self.headers(), **kw.pop("headers", {})},
                          timeout=kw.pop("timeout", 60), **kw)

    def openai(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def async_openai(self, **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  timeout=kw.pop("timeout", 120), **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_metrics(self.get("/metrics").text)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total, found = 0.0, False
        for (sample, sample_labels), value in self.metrics().items():
            if sample == name and set(labels.items()) <= set(sample_labels):
                total, found = total + value, True
        if not found:
            raise KeyError(f"no sample {name}{labels} in /metrics")
        return total

    # ---- waiting ----------------------------------------------------------------------------------------
    def _alive_or_raise(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with code {self.proc.returncode}; log:\n{self.log()[-4000:]}")

    def health(self) -> int | None:
        try:
            return httpx.get(self.base_url + "/health", timeout=5).status_code
        except httpx.TransportError:
            return None

    def wait_listening(self, timeout: float = 60) -> None:
        def listening() -> bool:
            self._alive_or_raise()
            return self.health() is not None

        wait_until(listening, timeout, "the server to accept connections")

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        def ready() -> bool:
            self._alive_or_raise()
            return self.health() == 200 and self.log().count("ready: serving") >= self.api_servers

        wait_until(ready, timeout, "the server to become ready")
        return self

    def engine_pid(self, timeout: float = 60) -> int:
        def find() -> int | None:
            m = re.search(r"started engine core 0 \(pid (\d+)\)", self.log())
            return int(m.group(1)) if m else None

        return wait_until(find, timeout, "the engine core process to start", interval=0.01)

    # ---- shutdown ---------------------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the API server process only (as a supervisor would) and wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"server did not exit within {timeout}s of {signal.Signals(sig).name}") from None

    def leftover_pids(self, timeout: float = 10) -> list[int]:
        """Processes of the server's group still alive after `timeout` (an empty list is the goal)."""
        try:
            wait_until(lambda: not process_group_pids(self.pgid), timeout, "the process group to empty")
        except TimeoutError:
            pass
        return process_group_pids(self.pgid)

    def socket_files(self) -> list[Path]:
        """Files under the server's TMPDIR (ipc sockets are abstract on Linux: there should be none)."""
        return sorted(self.sockdir.rglob("*"))

    def abstract_sockets(self) -> list[str]:
        """The server's abstract-namespace ipc sockets (`@elastic-<API server pid>-...`), from /proc/net/unix."""
        prefix = f"@elastic-{self.proc.pid}-"
        return sorted({line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()
                       if prefix in line})

    def close(self) -> None:
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
