"""Child processes (engine cores, API servers) end when the process that started them is gone."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection

logger = logging.getLogger(__name__)


def _watch(pipe: Connection, what: str, hard_exit_after_s: float | None) -> None:
    # The parent holds the write end and never writes: EOF means it is gone, and so should we be.
    try:
        pipe.recv_bytes()
    except (EOFError, OSError):
        pass
    logger.warning("the parent process is gone; %s exiting", what)
    os.kill(os.getpid(), signal.SIGTERM)
    if hard_exit_after_s is not None:
        # SIGTERM is handled between Python bytecodes: a process blocked in a collective with a dead peer
        # would only get there at the group's timeout. Give the clean exit a moment, then go regardless.
        time.sleep(hard_exit_after_s)
        os._exit(1)


def watch_parent(pipe: Connection, what: str, hard_exit_after_s: float | None = None) -> None:
    threading.Thread(target=_watch, args=(pipe, what, hard_exit_after_s), name="parent-watch", daemon=True).start()
