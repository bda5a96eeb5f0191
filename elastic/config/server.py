"""HTTP-side settings of `elastic serve` (the engine's live in EngineConfig), declared as options."""
from __future__ import annotations

from dataclasses import dataclass

from elastic.config.options import option, parse_size

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    host: str = option("0.0.0.0", "address to listen on")
    port: int = option(8000, "port to listen on (0: any free port)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every /v1 route")
    admin_api_key: str | None = option(
        None, "require 'Authorization: Bearer KEY' on admin routes (scaling, expert rebalancing); without it "
              "they are disabled")
    shutdown_timeout: float = option(
        10.0, "on SIGTERM / Ctrl-C: seconds in-flight requests get to finish before they are ended with an error")
    max_request_body_bytes: int = option(
        32 * 2**20, "largest request body accepted (413 above it), e.g. 32MiB", parse=parse_size)
    trust_request_chat_template: bool = option(
        False, "let requests bring their own chat_template (rendered in a sandbox with time and size limits); "
               "refused with a 400 otherwise")
    disable_uvicorn_access_log: bool = option(False, "no log line per HTTP request")
    log_level: str = option("info", "log level of the API server and engine processes", choices=LOG_LEVELS)
    api_server_count: int = option(
        1, "API server processes sharing the HTTP port, each connected to every engine")

    def __post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ValueError(f"api_server_count must be at least 1, got {self.api_server_count}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1024:
            raise ValueError(f"max_request_body_bytes must be at least 1024, got {self.max_request_body_bytes}")
        if not 0 <= self.shutdown_timeout < float("inf"):
            raise ValueError(f"shutdown_timeout must be a non-negative number of seconds, got {self.shutdown_timeout}")

    @property
    def access_log(self) -> bool:
        return not self.disable_uvicorn_access_log
