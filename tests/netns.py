"""Two "hosts" for multi-node tests: Linux network namespaces with their own addresses (a helper module).

Each namespace gets one end of a veth pair whose other end sits on a bridge in the test's namespace, so the
head (10.x.y.1) and the worker (10.x.y.2) have separate network stacks, talk over TCP through the bridge,
and the test reaches both. Names are unique per run and everything is deleted on exit, also after a
failure. Without the rights to create namespaces (not root), or with ELASTIC_TEST_NO_NETNS=1, both
"hosts" are loopback addresses of this stack: the tests then say so (a warning) and still run.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from server_fixtures import REPO_ROOT, free_port, wait_until


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Hosts:
    """`head` and `worker`: (address, command prefix). Use as a context manager."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.netns: list[str] = []
        self.links: list[str] = []
        self.isolated = False
        self.prefix: dict[str, list[str]] = {"head": [], "worker": []}
        self.address = {"head": "127.0.0.1", "worker": "127.0.0.1"}

    def __enter__(self) -> Hosts:
        if os.environ.get("ELASTIC_TEST_NO_NETNS"):
            return self._fallback("ELASTIC_TEST_NO_NETNS is set")
        if os.geteuid() != 0 or shutil.which("ip") is None:
            return self._fallback("not root, or no `ip` command")
        try:
            self._create()
        except (subprocess.SubprocessError, OSError) as e:
            self.close()
            return self._fallback(getattr(e, "stderr", b"").decode(errors="replace").strip() or str(e))
        self.isolated = True
        return self

    def _create(self) -> None:
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
        bridge = f"elbr{self.tag}"
        _ip("link", "add", bridge, "type", "bridge")
        self.links.append(bridge)
        _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, host in enumerate(("head", "worker"), start=1):
            ns, inner, outer = f"el{host[0]}-{self.tag}", f"el{host[0]}i{self.tag}", f"el{host[0]}o{self.tag}"
            _ip("netns", "add", ns)
            self.netns.append(ns)
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            self.links.append(outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge)
            _ip("link", "set", outer, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{i}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.prefix[host] = ["ip", "netns", "exec", ns]
            self.address[host] = f"{subnet}.{i}"

    def _fallback(self, why: str) -> Hosts:
        message = f"network namespaces unavailable ({why}): head and worker share loopback addresses"
        warnings.warn(message)
        print(message, file=sys.stderr)
        return self

    def close(self) -> None:
        for ns in self.netns:  # deleting a namespace deletes its veth end, and with it the peer
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)
        self.netns.clear()
        self.links.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NodeProcess:
    """`elastic serve ...` on one host (inside its namespace), in its own process group, with a log file."""

    def __init__(self, hosts: Hosts, host: str, *args: str, http: bool = True, env: dict[str, str] | None = None,
                 name: str = "node") -> None:
        self.address = hosts.address[host]
        self.port = free_port() if http else None
        self.dir = Path(tempfile.mkdtemp(prefix=f"el-{name}-"))
        self.log_path = self.dir / "log"
        cmd = [*hosts.prefix[host], sys.executable, "-m", "elastic", "serve", *args]
        if http:
            cmd += ["--host", self.address, "--port", str(self.port)]
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                             os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.dir), **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> int | None:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=5).status_code
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 180) -> NodeProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; log:\n{self.log()[-4000:]}")
            return self.health() == 200

        wait_until(ready, timeout, f"{self.url} to become ready", interval=0.2)
        return self

    def wait_exit(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
