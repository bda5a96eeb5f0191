"""The config tree: parsed once (from `LLM(**kwargs)` or the CLI), then passed down read-only."""
from elastic.config.engine import *  # noqa: F401,F403
from elastic.config.engine import create_engine_config  # noqa: F401
from elastic.config.model_arch import ModelArch, load_arch  # noqa: F401
