"""Offline batch inference, shaped like vLLM's `LLM` so scripts can switch engines."""
from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any, Sequence

from tqdm.auto import tqdm

from elastic.config import create_engine_config
from elastic.engine.core import EngineCore
from elastic.frontend.input_processor import InputProcessor, PromptType
from elastic.frontend.output_processor import OutputProcessor
from elastic.outputs import RequestOutput
from elastic.sampling_params import SamplingParams
from elastic.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from elastic.frontend.sync_client import SyncEngineClient

logger = logging.getLogger(__name__)

ChatMessages = list[dict[str, Any]]


class LLM:
    """`LLM(model, dtype=..., device=..., max_model_len=..., load_format=..., **engine_args)`.

    With no model, the built-in demo checkpoint is created (once) and used. With `data_parallel_size=N > 1`
    the N ranks are engine-core processes (one per GPU) driven through the server's own client and DP
    coordinator on a background thread (`self.dp`); `generate` and `chat` behave the same. Call
    `shutdown()` (or use `with LLM(...) as llm:`) to stop them early; they also stop at exit. The processes
    are spawned (CUDA is not fork-safe), so a script must create the LLM under `if __name__ == "__main__":`.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        if model is None:
            from elastic.demo import ensure_demo_model

            model = str(ensure_demo_model())
        self.config = create_engine_config(model, **engine_args)
        self._ids = itertools.count()
        self.dp: SyncEngineClient | None = None
        self.engine: EngineCore | None = None
        if self.config.parallel.is_distributed:
            from elastic.frontend.sync_client import SyncEngineClient

            # The engine processes log at the level this process logs at (quiet unless asked).
            level = logging.getLevelName(logging.getLogger("elastic").getEffectiveLevel())
            self.dp = SyncEngineClient(self.config, log_level=level)
            self.tokenizer = self.dp.engine.tokenizer
            self.input_processor = self.dp.engine.input_processor
            return
        self.tokenizer = None if self.config.model.skip_tokenizer_init else load_tokenizer(self.config.model.tokenizer)
        self.engine = EngineCore(self.config)
        self.input_processor = InputProcessor(self.tokenizer, self.config.model)

    def shutdown(self) -> None:
        """Stop the engine processes (data parallelism); the single-rank engine needs nothing."""
        if self.dp is not None:
            self.dp.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- expert load balancing (engines started with enable_eplb=True) ---------------------------------
    def rebalance_experts(self) -> dict[str, Any]:
        """Re-place experts by the recorded load now, on every rank; returns the placement and figures."""
        if self.dp is not None:
            from elastic.frontend.eplb_client import rebalance_experts

            return self.dp.call(rebalance_experts(self.dp.engine.client))
        assert self.engine is not None
        self.engine.request_rebalance()
        while self.engine.global_unfinished:  # rebalance steps (no forward without requests)
            self.engine.step()
        return self.engine.eplb_state()

    def eplb_state(self, rank: int | None = None) -> dict[str, Any]:
        """Placement per layer, replica counts and EPLB figures (of one rank: they agree on every rank)."""
        if self.dp is not None:
            return self.dp.call_utility(rank or 0, "eplb_state")
        assert self.engine is not None
        return self.engine.eplb_state()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.input_processor.default_sampling_params()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = (list(sampling_params) if isinstance(sampling_params, Sequence)
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        # Tokenize and validate everything before anything is queued, so a bad prompt loses nothing.
        batch = []
        for prompt, params in zip(prompts, params_list):
            text, token_ids = self.input_processor.tokenize(prompt)
            rid = str(next(self._ids))
            reqs = self.input_processor.make_requests(rid, token_ids, params)
            if self.dp is not None:
                self.dp.engine.validate(token_ids, params)
            else:
                for req in reqs:
                    self.engine.validate(req)
            batch.append((rid, text, token_ids, reqs))
        if self.dp is not None:
            return self._run_dp(batch, params_list, use_tqdm)
        outputs = OutputProcessor(self.tokenizer)
        order: list[str] = []
        for rid, text, token_ids, reqs in batch:
            outputs.add_request(rid, text, token_ids, [r.request_id for r in reqs], [r.sampling_params for r in reqs])
            order.append(rid)
            for req in reqs:
                self.engine.add_request(req)
        return self._run(outputs, order, use_tqdm)

    def _run_dp(self, batch: list, params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        assert self.dp is not None
        bar = tqdm(total=len(batch), desc="Generating", unit="req", disable=not use_tqdm, leave=False)
        try:
            return self.dp.generate_batch([(rid, text, token_ids, params) for (rid, text, token_ids, _), params
                                           in zip(batch, params_list)], on_finished=lambda _: bar.update(1))
        finally:
            bar.close()

    def _run(self, outputs: OutputProcessor, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Generating", unit="req", disable=not use_tqdm, leave=False)
        num_generated = 0
        try:
            while outputs.has_unfinished():
                engine_outputs = self.engine.step()
                num_generated += sum(len(o.new_token_ids) for o in engine_outputs)
                snapshots, to_abort = outputs.process(engine_outputs)
                if to_abort:
                    self.engine.abort_requests(to_abort)
                for snap in snapshots:
                    if snap.finished:
                        finished[snap.request_id] = snap
                        bar.update(1)
                bar.set_postfix(tokens=num_generated, refresh=False)
        except BaseException:
            # Leave the engine clean (KeyboardInterrupt included) so the LLM stays usable.
            self.engine.abort_requests(list(self.engine.scheduler.requests))
            raise
        finally:
            bar.close()
        return [finished[rid] for rid in order]

    def chat(self, messages: ChatMessages | list[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        renderer, encoder = self.input_processor.chat_renderer, self.input_processor.text_encoder
        if renderer is None or encoder is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        kwargs = dict(chat_template_kwargs or {})
        template = kwargs.pop("chat_template", None)  # offline callers are trusted with their own template
        prompts: list[PromptType] = []
        for conversation in conversations:  # the server's renderer: same sandbox, limits and prompts
            text = renderer.render(conversation, add_generation_prompt=add_generation_prompt, template=template,
                                   kwargs=kwargs)
            prompts.append({"prompt_token_ids": encoder.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
