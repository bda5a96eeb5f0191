"""Tokenizer and generation defaults of a checkpoint directory (front-end side only)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json fields that become default sampling parameters (as vLLM's --generation-config auto).
_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy import, front end only

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


def generation_defaults(model_dir: str) -> dict[str, Any]:
    """Sampling defaults and extra EOS ids from generation_config.json (empty if absent)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        logger.warning("ignoring malformed %s: %s", path, e)
        return {}
    defaults = {k: cfg[k] for k in _SAMPLING_DEFAULTS if cfg.get(k) is not None}
    eos = cfg.get("eos_token_id")
    if eos is not None:
        defaults["eos_token_ids"] = eos if isinstance(eos, list) else [eos]
    return defaults
