"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from torch import nn

from csps.model.llama import LlamaForCausalLM

# NOTE: Mistral checkpoints without a sliding window are Llama-shaped (LlamaArchConfig rejects
# a sliding window). Qwen2 is not listed: it has q/k/v biases, which this decoder lacks.
MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def get_model_class(architectures: tuple[str, ...] | list[str]) -> type[nn.Module]:
    """The class for the first supported architecture; ValueError listing the supported ones."""
    for name in architectures:
        if name in MODEL_CLASSES:
            return MODEL_CLASSES[name]
    raise ValueError(f"unsupported architectures {list(architectures)}; "
                     f"supported: {sorted(MODEL_CLASSES)}")
