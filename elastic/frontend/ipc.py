"""Where local ipc:// sockets live: Linux's abstract socket namespace, so nothing is ever left on disk.

An abstract socket (`ipc://@name`) has no file: it vanishes with the last process holding it, so an API
server killed outright (SIGKILL, the OOM killer) leaves no socket directory behind, and there is nothing to
sweep at the next start. Elsewhere (macOS) a private temp directory is used and removed on a clean exit.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys

from elastic.cluster.engine_process import make_socket_dir

ABSTRACT_PREFIX = "@"


def make_ipc_namespace() -> str:
    """A fresh prefix for this server's sockets: `ipc://{prefix}/{name}` (e.g. '@elastic-1234-9f3a0c1b')."""
    if sys.platform.startswith("linux"):
        return f"{ABSTRACT_PREFIX}elastic-{os.getpid()}-{secrets.token_hex(4)}"
    return make_socket_dir()


def remove_ipc_namespace(prefix: str | None) -> None:
    """Remove what a namespace left on disk (nothing, for an abstract one)."""
    if prefix and not prefix.startswith(ABSTRACT_PREFIX):
        shutil.rmtree(prefix, ignore_errors=True)
