"""The shared-memory per-step DP exchange (elastic/distributed/host_exchange.py): ranks are processes forked
from the test, each with its own gloo group over one store, as engine processes of one host have."""
from __future__ import annotations

import datetime
import glob
import multiprocessing
import multiprocessing.connection
import os
import threading
import time

import pytest

from elastic.distributed.group import StatelessGroup, create_store
from elastic.distributed.host_exchange import SharedMemoryAllGather, on_one_host, shared_memory_usable

pytestmark = pytest.mark.skipif(not shared_memory_usable(), reason="needs /dev/shm on x86")


def _rank_main(fn, port_pipe: multiprocessing.connection.Connection, name: str, rank: int, world: int) -> None:
    try:
        store = create_store("127.0.0.1", port_pipe.recv(), is_master=False)
        group = StatelessGroup(store, name, rank, world, "gloo", timeout=datetime.timedelta(seconds=30))
        fn(group, store)
        group.destroy()
    except BaseException:
        import traceback
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _run_ranks(world: int, fn, name: str) -> None:
    # Forked before the store exists: its server thread must not be running at the fork (a lock it held then
    # would stay held in the child for ever); each rank gets the port through a pipe.
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(fn, reader, name, r, world), daemon=True)
             for r, (reader, _) in enumerate(pipes)]
    for p in procs:
        p.start()
    store = create_store("127.0.0.1", 0, is_master=True)
    for _, writer in pipes:
        writer.send(store.port)
    try:
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * world
    finally:
        for p in procs:
            p.kill()


def _steps(group: StatelessGroup, store) -> None:
    assert on_one_host(group)
    exchange = SharedMemoryAllGather(group, width=3)
    for step in range(300):
        rows = exchange.all_gather([group.rank, step, group.rank * step]).tolist()
        assert rows == [[r, step, r * step] for r in range(group.world_size)], (step, rows)
    exchange.close()


def test_every_rank_sees_every_row_each_step_and_no_file_stays() -> None:
    before = set(glob.glob("/dev/shm/elastic-dp-*"))
    _run_ranks(3, _steps, "dp/steps")
    assert set(glob.glob("/dev/shm/elastic-dp-*")) == before  # unlinked once every rank mapped it


def _rank_1_never_posts(group: StatelessGroup, store) -> None:
    exchange = SharedMemoryAllGather(group, width=1)
    if group.rank == 1:  # "dead": never posts, and waits until rank 0 is done
        store.get("abort-test-done")
        return
    # Fault recovery's watcher thread aborts the groups once the launcher says a peer died.
    start = time.monotonic()
    threading.Timer(0.3, group.abort).start()
    with pytest.raises(RuntimeError, match="aborted"):
        exchange.all_gather([1])
    assert time.monotonic() - start >= 0.3  # it waited for the peer until then
    store.set("abort-test-done", "1")


def test_abort_releases_a_rank_waiting_for_a_dead_peer() -> None:
    _run_ranks(2, _rank_1_never_posts, "dp/abort")
