"""Models: resolve a name to an HF folder, load a Llama-family decoder from it, tokenize."""

from csps.model.arch_config import LlamaArchConfig
from csps.model.loader import load_model
from csps.model.registry import get_model_class
from csps.model.resolve import resolve_model
from csps.model.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["IncrementalDetokenizer", "LlamaArchConfig", "Tokenizer", "get_model_class",
           "load_model", "resolve_model"]
