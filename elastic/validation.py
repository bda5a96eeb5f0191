"""Request checks shared by every front end and the engine core itself: one definition, enforced twice
(the front end answers the client before anything is queued; the engine never trusts its sockets).

The model-independent bounds (int64-safe integers, finite floats, caps on n, stop strings, logit_bias) are
SamplingParams' own checks, run on construction and on every decode; this adds what depends on the model."""
from __future__ import annotations

from elastic.config import ModelConfig
from elastic.sampling_params import SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, model: ModelConfig,
                     num_kv_blocks: int | None, block_size: int, eos_token_id: int | None = None) -> None:
    """Raise ValueError for a request no engine could finish. The engine core checks this on every
    request; front ends check it first, so a client gets its error before anything is queued."""
    max_len = model.max_model_len
    n_prompt = len(prompt_token_ids)
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    if n_prompt >= max_len:
        raise ValueError(f"the prompt has {n_prompt} tokens; max_model_len is {max_len}, "
                         "which must leave room for at least one generated token")
    vocab = model.arch.vocab_size
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
    if params.stop_token_ids and any(not 0 <= t < vocab for t in params.stop_token_ids):
        raise ValueError(f"stop_token_ids must be in [0, {vocab})")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab:  # the sampler indexes logits with it
        raise ValueError(f"eos_token_id must be in [0, {vocab})")
    if num_kv_blocks is not None:
        total = min(max_len, n_prompt + (params.max_tokens or max_len))
        if -(-total // block_size) > num_kv_blocks:
            raise ValueError(f"the request may need {total} tokens of KV cache; the cache holds only "
                             f"{num_kv_blocks * block_size}")
