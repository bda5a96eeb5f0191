"""Logging set-up shared by the API server and engine core processes (one format, process name included)."""
from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once per process (spawned engines call this too: they start blank)."""
    if isinstance(level, str):
        level = level.upper()
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT, force=True)
    # Chatty third-party loggers stay at WARNING unless debugging.
    if logging.getLogger().level > logging.DEBUG:
        for name in ("httpx", "httpcore", "filelock", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


def warn_if_hub_kernels_active(logger: logging.Logger) -> bool:
    """transformers swaps in Hugging Face hub kernels when a `kernels` package is importable; our repo's
    `kernels/` directory shares that name. Returns True (and warns) if transformers believes it is there."""
    try:
        from transformers.utils.import_utils import is_kernels_available
    except ImportError:
        return False
    if is_kernels_available():
        logger.warning("transformers reports a usable `kernels` package (hub kernels integration is ON); "
                       "this process may be importing the wrong `kernels` module")
        return True
    return False
