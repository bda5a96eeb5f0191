"""Front-end side of outputs: detokenize, apply stop strings, collect the n samples of a request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic.frontend.detokenizer import IncrementalDetokenizer
from elastic.outputs import CompletionOutput, RequestOutput
from elastic.protocol.from_engine import EngineCoreOutput
from elastic.sampling_params import SamplingParams


@dataclass
class _Sample:
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    output: CompletionOutput
    text_end: int | None = None  # where a stop string cut the text


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def snapshot(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.output for s in self.samples], prompt_logprobs=self.prompt_logprobs,
                             finished=self.finished,
                             num_cached_tokens=self.num_cached_tokens)

    @property
    def finished(self) -> bool:
        return all(s.output.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}
        self.sample_of: dict[str, tuple[_Request, _Sample]] = {}  # engine request id -> its sample

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    child_ids: list[str], child_params: list[SamplingParams]) -> None:
        state = _Request(request_id, prompt, prompt_token_ids)
        for index, (child_id, params) in enumerate(zip(child_ids, child_params)):
            sample = _Sample(index, params,
                             IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                             CompletionOutput(index=index, text="", token_ids=[],
                                              cumulative_logprob=0.0 if params.logprobs is not None else None,
                                              logprobs=[] if params.logprobs is not None else None))
            state.samples.append(sample)
            self.sample_of[child_id] = (state, sample)
        self.requests[request_id] = state

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def remove(self, request_id: str) -> list[str]:
        """Forget a request (e.g. its client went away); returns its engine request ids to abort."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        child_ids = [cid for cid, (st, _) in self.sample_of.items() if st is state]
        for cid in child_ids:
            del self.sample_of[cid]
        return child_ids

    def token_ids(self, engine_request_id: str) -> list[int]:
        """Every token received for one engine request so far (a re-run continues after them)."""
        entry = self.sample_of.get(engine_request_id)
        return list(entry[1].output.token_ids) if entry is not None else []

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply engine outputs. Returns snapshots of the requests that changed, and engine request ids
        to abort because a stop string finished them."""
        changed: dict[str, _Request] = {}
        to_abort: list[str] = []
        for eo in outputs:
            entry = self.sample_of.get(eo.request_id)
            if entry is None:
                continue  # already finished by a stop string, or removed
            state, sample = entry
            if self._update(sample, eo):
                to_abort.append(eo.request_id)
            state.num_cached_tokens = max(state.num_cached_tokens, eo.num_cached_tokens)
            if eo.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [None if lp is None else dict(zip(lp.token_ids, lp.logprobs))
                                         for lp in eo.prompt_logprobs]
            if sample.output.finished:
                del self.sample_of[eo.request_id]
            changed[state.request_id] = state
        snapshots = []
        for rid, state in changed.items():
            snapshots.append(state.snapshot())
            if state.finished:
                del self.requests[rid]
        return snapshots, to_abort

    def _update(self, sample: _Sample, eo: EngineCoreOutput) -> bool:
        """Returns True when a stop string ended the sample (the engine must be told to abort it)."""
        out, params = sample.output, sample.params
        out.token_ids.extend(eo.new_token_ids)
        if eo.new_logprobs and out.logprobs is not None:
            for lp in eo.new_logprobs:
                out.logprobs.append(dict(zip(lp.token_ids, lp.logprobs)))
                out.cumulative_logprob = (out.cumulative_logprob or 0.0) + lp.logprobs[0]
        before = len(sample.detok.text)
        sample.detok.add(eo.new_token_ids)
        if eo.finish_reason is not None:
            sample.detok.flush()
        text = sample.detok.text
        stopped_by_string = False
        if params.stop and len(text) > before:
            hit = _find_stop(text, params.stop, max(0, before - params.max_stop_len + 1))
            if hit is not None:
                pos, stop = hit
                sample.text_end = pos + (len(stop) if params.include_stop_str_in_output else 0)
                out.finish_reason, out.stop_reason = "stop", stop
                stopped_by_string = eo.finish_reason is None
        if out.finish_reason is None and eo.finish_reason is not None:
            out.finish_reason = eo.finish_reason
            out.stop_reason = eo.stop_reason
        if sample.text_end is not None:
            out.text = text[:sample.text_end]
        elif params.stop and not params.include_stop_str_in_output and not out.finished:
            out.text = text[:max(0, len(text) - params.max_stop_len + 1)]  # might still become a stop string
        else:
            out.text = text
        return stopped_by_string


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        pos = text.find(stop, start)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, stop)
    return best
