"""csps: a serving engine for LLMs with long prompts (sequence-parallel prefill, CSA, SP decode).

The public API is lazy so that `import csps.scheduler` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from csps.config import EngineConfig
from csps.inputs import PromptType, TextPrompt, TokensPrompt
from csps.request import SamplingParams

if TYPE_CHECKING:
    from csps.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "PromptType", "SamplingParams", "TextPrompt", "TokensPrompt",
           "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from csps.llm import LLM

        return LLM
    raise AttributeError(f"module 'csps' has no attribute {name!r}")
