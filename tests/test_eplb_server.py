"""EPLB through the server: `GET /eplb`, `POST /eplb/rebalance` behind the admin key, elastic:eplb_* metrics,
and completions unchanged by a rebalance."""
from __future__ import annotations

import pytest
from conftest import random_prompts
from server_fixtures import TEST_SERVER_ARGS, ServerProcess

ADMIN = "admin-secret"
PROMPTS = random_prompts((6, 13, 9), seed=3)


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    path = checkpoint_dir("qwen3_moe", router_zipf=1.5)
    with ServerProcess(path, *TEST_SERVER_ARGS, "-dp", "2", "--enable-eplb", "--num-redundant-experts", "2",
                       "--eplb-step-interval", "100000", "--admin-api-key", ADMIN) as server:
        yield server.wait_ready()


def _complete(server: ServerProcess) -> list[list[int]]:
    client = server.openai()
    outs = [client.completions.create(model=client.models.list().data[0].id, prompt=p, max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
            for p in PROMPTS]
    return [o.choices[0].text for o in outs]


def test_rebalance_route_needs_the_admin_key_and_keeps_outputs(server: ServerProcess) -> None:
    before = _complete(server)
    state = server.get("/eplb").json()
    assert state["num_ranks"] == 2 and state["slots_per_rank"] == 5  # ceil((8 + 2) / 2)
    assert server.post("/eplb/rebalance").status_code == 401
    assert server.post("/eplb/rebalance", headers={"Authorization": "Bearer wrong"}).status_code == 401
    done = server.post("/eplb/rebalance", headers={"Authorization": f"Bearer {ADMIN}"})
    assert done.status_code == 200, done.text
    stats = done.json()["stats"]
    assert stats["rebalances"] == 1 and stats["balancedness"] > stats["balancedness_before"]
    assert server.get("/eplb").json()["physical_to_logical"] == done.json()["physical_to_logical"]
    assert _complete(server) == before
    assert server.metric("elastic:eplb_rebalances_total") == 2  # one per engine series
    assert 0 < server.metric("elastic:eplb_balancedness", engine="0") <= 1
    assert server.metric("elastic:eplb_bytes_moved_total") > 0
