"""`--data-parallel-backend ray`: engine ranks as Ray actors on a local CPU Ray cluster (one CPU bundle per
rank), DP=2 serving outputs equal to one engine, then POST /scale 2 -> 3 -> 2 under streaming load with no
failed request (Ray places the new rank; the leaving one is killed and its placement group removed).
Skipped when Ray is not installed (`pip install -e '.[ray]'`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import httpx
import pytest
from server_fixtures import TEST_SERVER_ARGS, ServerProcess, free_port, process_group_pids, wait_until
from test_multinode import PROMPTS, Load, check_outputs, model  # noqa: F401 - `model` is a fixture

pytest.importorskip("ray")

ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}  # a private loopback cluster for this test


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 4 logical CPUs (3 ranks fit) in its own process group, always stopped."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    log = open(os.path.join(temp, "start.log"), "wb")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus", "4", "--port", str(port),
                             "--node-ip-address", "127.0.0.1", "--include-dashboard=false", "--temp-dir", temp],
                            env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: b"Ray runtime started" in open(log.name, "rb").read() or proc.poll() is not None, 60,
                   "the Ray cluster to start", interval=0.2)
        assert proc.poll() is None, open(log.name, "rb").read()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        for sig, grace in ((signal.SIGTERM, 2), (signal.SIGKILL, 10)):  # the whole cluster: its own group
            try:
                os.killpg(proc.pid, sig)
                proc.wait(grace)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        wait_until(lambda: not process_group_pids(proc.pid), 10, "the Ray cluster's processes to exit")
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def scale(server: ServerProcess, size: int) -> dict:
    r = server.post("/scale", json={"new_data_parallel_size": size}, headers={"Authorization": "Bearer k"},
                    timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == "succeeded", r.json()
    return r.json()


def test_ray_dp2_scales_2_3_2_under_load(model, ray_cluster) -> None:  # noqa: F811
    path, expected = model
    args = ("--served-model-name", "m", "--admin-api-key", "k", "--scale-phase-timeout", "60", "-dp", "2",
            "--data-parallel-backend", "ray", "--data-parallel-address", "127.0.0.1", "--no-restart-failed-ranks")
    with ServerProcess(path, *TEST_SERVER_ARGS, *args, env={**ENV, "RAY_ADDRESS": ray_cluster}) as server:
        server.wait_ready(180)
        check_outputs(server.base_url, expected)
        with Load([server.base_url]) as load:
            scale(server, 3)
            before = len(load.results)
            wait_until(lambda: len(load.results) >= before + len(PROMPTS), 120, "requests at three ranks")
            scale(server, 2)
            before = len(load.results)
            wait_until(lambda: len(load.results) >= before + len(PROMPTS), 120, "requests after the shrink")
        assert load.check(expected) >= 3 * len(PROMPTS)
        log = server.log()
        assert log.count("asked Ray to place engine core") == 3
        assert httpx.get(server.base_url + "/scale", timeout=10).json()["data_parallel_size"] == 2
        assert server.stop() == 0
