"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from csps.config import engine_config_from_kwargs
from csps.engine.llm_engine import LLMEngine
from csps.engine.outputs import RequestOutput
from csps.engine.parent_request import merge_output
from csps.inputs import PromptType, batch_prompts, parse_prompt
from csps.request import SamplingParams


class LLM:
    """An engine in this process. Keywords are the config's flat field names (see csps serve
    --help), e.g. LLM(model="smollm2-135m", max_num_batched_tokens=512, scheduler="sarathi")."""

    def __init__(self, model: str = "smollm2-135m", **kwargs) -> None:
        self.llm_engine = LLMEngine(engine_config_from_kwargs(model=model, **kwargs))
        self._next_id = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. A prompt is a string,
        a list of token ids, {"prompt": str} or {"prompt_token_ids": [...]} (csps.inputs)."""
        engine = self.llm_engine
        prompts = batch_prompts(prompts)
        parsed = [parse_prompt(prompt, engine.tokenizer.encode, i)
                  for i, prompt in enumerate(prompts)]  # every form checked before any is added
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("sampling_params must be one per prompt")
        order = []
        for (text, token_ids), params in zip(parsed, sampling_params, strict=True):
            request_id = str(self._next_id)
            self._next_id += 1
            engine.add_request(request_id, text, token_ids, params)
            order.append(request_id)
        finished: dict[str, RequestOutput] = {}
        merged: dict[str, RequestOutput] = {}  # every completion (n > 1) seen so far
        with tqdm(total=len(order), disable=not use_tqdm, desc="Generating") as bar:
            while engine.has_unfinished_requests():
                outputs, _ = engine.step()
                for output in outputs:
                    merged[output.request_id] = merge_output(merged.get(output.request_id),
                                                             output)
                    if output.finished:
                        finished[output.request_id] = merged[output.request_id]
                        bar.update(1)
        return [finished[request_id] for request_id in order]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One chat conversation through the model's chat template."""
        token_ids = self.llm_engine.tokenizer.apply_chat_template(messages)
        return self.generate([token_ids], sampling_params, use_tqdm)
