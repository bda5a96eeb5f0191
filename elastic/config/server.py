"""HTTP-side settings of `elastic serve` (the engine's live in EngineConfig), declared as options."""
from __future__ import annotations

from dataclasses import dataclass

from elastic.config.options import option

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(8000, "port to listen on (0: any free port)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/*")
    shutdown_timeout: float = option(10.0, "seconds in-flight requests get to finish on SIGTERM / Ctrl-C")
    disable_uvicorn_access_log: bool = option(False, "no log line per HTTP request")
    log_level: str = option("info", "log level of the API server and engine processes", choices=LOG_LEVELS)
    api_server_count: int = option(
        1, "API server processes sharing the HTTP port, each connected to every engine")
    data_parallel_address: str | None = option(
        None, "use tcp:// on this address between API server and engines (default: ipc sockets)")
    data_parallel_rpc_port: int = option(0, "handshake port when using tcp (0: any free port)")

    def __post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ValueError(f"api_server_count must be at least 1, got {self.api_server_count}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")

    @property
    def access_log(self) -> bool:
        return not self.disable_uvicorn_access_log
