"""Turns the last-position logits of a batch into next tokens (and their logprobs).

Order, as in vLLM: penalties, logit bias and min_tokens masking on the raw logits; greedy rows take the
argmax; other rows are scaled by temperature, truncated by top-k / top-p / min-p and sampled with the
exponential race (argmax p / q, q ~ Exp(1)), which lets each seeded request draw from its own generator.
Logprobs are the log-softmax of the distribution actually sampled from.

`sample()` is what the engine calls: when the batch fails (a request whose parameters slipped past
validation, a distribution with no finite value), each row is sampled alone, so only the culprit fails.
"""
from __future__ import annotations

import logging

import torch

from elastic.layers.pinned_copy import to_device
from elastic.protocol.from_engine import TokenLogprobs
from elastic.request import Request

logger = logging.getLogger(__name__)


def _needs_processing(req: Request) -> bool:
    p = req.params
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.logit_bias
                or req.num_output_tokens < p.min_tokens)


def _apply_penalties(logits: torch.Tensor, reqs: list[Request]) -> None:
    for row, req in enumerate(reqs):
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), device=logits.device, dtype=torch.long)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.num_output_tokens:
            out = torch.tensor(req.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device, dtype=torch.long)
            logits[row, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device, dtype=logits.dtype)
        if req.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids or [])
            if req.eos_token_id is not None:
                banned.append(req.eos_token_id)
            if banned:
                logits[row, banned] = float("-inf")


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    # logits [B, V]; top_k [B] (0 = off); top_p, min_p [B]
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    positions = torch.arange(vocab, device=logits.device)[None, :]
    drop = positions >= k[:, None]
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _on(device: torch.device, values: list) -> torch.Tensor:
    """A small per-row parameter tensor on `device`, without a host sync."""
    return to_device(torch.tensor(values), device)


def _check_finite(best: torch.Tensor) -> None:
    """A row whose best value is NaN or -inf has no distribution to sample from (NaN logits, everything
    masked): its token would be arbitrary, so the row fails rather than answer garbage."""
    if not bool(torch.isfinite(best).all()):
        raise ValueError("the sampling distribution has no finite value")


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, reqs: list[Request]
               ) -> tuple[list[int | None], list[TokenLogprobs | None], dict[int, str]]:
        """`self(logits, reqs)`, except that a failure fails only the rows causing it: then every row is
        sampled alone. Returns tokens (None where failed), logprobs, and {row: why} for the failed rows."""
        try:
            tokens, logprobs = self(logits, reqs)
            return list(tokens), logprobs, {}
        except Exception:
            if len(reqs) == 1:
                logger.exception("sampling failed for request %s", reqs[0].request_id)
                return [None], [None], {0: "the engine could not sample the next token"}
            logger.warning("sampling a batch of %d failed; sampling each request alone", len(reqs))
        tokens_out: list[int | None] = []
        logprobs_out: list[TokenLogprobs | None] = []
        errors: dict[int, str] = {}
        for row, req in enumerate(reqs):
            token, lp, error = self.sample(logits[row:row + 1], [req])
            tokens_out.append(token[0])
            logprobs_out.append(lp[0])
            if error:
                errors[row] = error[0]
        return tokens_out, logprobs_out, errors

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        # logits [B, V] float32, one row per request in `reqs`; left unchanged (sample() may retry per row)
        if any(_needs_processing(r) for r in reqs):
            logits = logits.clone()
            _apply_penalties(logits, reqs)
        want_logprobs = any(r.params.logprobs is not None for r in reqs)
        best, sampled, logprobs, greedy = self._distribution(logits, reqs, want_logprobs)
        _check_finite(best)  # before any random draw: a failing batch is sampled again row by row
        sampled = self._race(sampled, logprobs, greedy, reqs)
        return sampled.tolist(), self._gather_logprobs(logprobs, sampled, reqs)

    def sample_on_device(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] of requests without penalties, bias or logprobs -> (tokens [B], whether each row's
        distribution has a finite value [B]), with no host sync: a pipelined decode step (engine/pipeline.py)
        reads them later, and a row without a finite value fails then."""
        best, sampled, logprobs, greedy = self._distribution(logits, reqs, want_logprobs=False)
        return self._race(sampled, logprobs, greedy, reqs), torch.isfinite(best)

    @staticmethod
    def _distribution(logits: torch.Tensor, reqs: list[Request], want_logprobs: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> (best value [B], argmax [B], logprobs of the distribution sampled from [B, V]: None when every row
        is greedy and none wants them, which rows are greedy [B]: None when all are). Decisions read the
        requests' parameters: no host sync."""
        if all(r.params.greedy for r in reqs):  # the common serving case: no extra passes over the vocab
            best, sampled = logits.max(dim=-1)
            return best, sampled, torch.log_softmax(logits, dim=-1) if want_logprobs else None, None
        device = logits.device
        params = [r.params for r in reqs]
        greedy = _on(device, [p.greedy for p in params])
        temperature = _on(device, [1.0 if p.greedy else p.temperature for p in params])
        processed = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            top_k = _on(device, [p.top_k for p in params])
            top_p = _on(device, [p.top_p for p in params])
            min_p = _on(device, [p.min_p for p in params])
            needs_truncation = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
            truncated = _truncate(processed, top_k, top_p, min_p)
            processed = torch.where((needs_truncation & ~greedy)[:, None], truncated, processed)
        logprobs = torch.log_softmax(processed, dim=-1)
        best, sampled = logprobs.max(dim=-1)
        return best, sampled, logprobs, greedy

    def _race(self, sampled: torch.Tensor, logprobs: torch.Tensor | None, greedy: torch.Tensor | None,
              reqs: list[Request]) -> torch.Tensor:
        """Rows that sample (greedy[b] False) take the exponential race's winner; greedy rows keep their argmax
        (greedy None: every row is greedy)."""
        if greedy is None:
            return sampled
        assert logprobs is not None
        race = logprobs.exp() / self._exponentials(reqs, logprobs.shape, logprobs.device)
        return torch.where(greedy, sampled, race.argmax(dim=-1))

    def _exponentials(self, reqs: list[Request], shape: torch.Size, device: torch.device) -> torch.Tensor:
        q = torch.empty(shape, device=device).exponential_(generator=self.generator)
        for row, req in enumerate(reqs):
            if req.generator is not None:
                q[row].exponential_(generator=req.generator)
        return q

    @staticmethod
    def _gather_logprobs(logprobs: torch.Tensor | None, sampled: torch.Tensor,
                         reqs: list[Request]) -> list[TokenLogprobs | None]:
        wanted = [r.params.logprobs for r in reqs]
        if logprobs is None or all(n is None for n in wanted):
            return [None] * len(reqs)
        max_n = max(n or 0 for n in wanted)
        sampled_lp = logprobs.gather(1, sampled[:, None]).squeeze(1)  # [B]
        ranks = (logprobs > sampled_lp[:, None]).sum(dim=-1) + 1  # [B]
        max_n = min(max_n, logprobs.shape[-1])  # a vocabulary smaller than the asked-for top-n
        top_lp, top_ids = logprobs.topk(max_n, dim=-1) if max_n else (None, None)
        result: list[TokenLogprobs | None] = []
        for row, n in enumerate(wanted):
            if n is None:
                result.append(None)
                continue
            ids = [int(sampled[row])] + (top_ids[row, :n].tolist() if n else [])
            lps = [float(sampled_lp[row])] + (top_lp[row, :n].tolist() if n else [])
            result.append(TokenLogprobs(token_ids=ids, logprobs=lps, sampled_rank=int(ranks[row])))
        return result
