"""Tokenizer files for a GGUF conversion: transformers builds a fast tokenizer from the GGUF's
vocabulary offline; we save it and make sure the chat template and special tokens travel too.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_tokenizer(gguf_path: Path, out_dir: Path, meta: dict) -> None:
    """Write tokenizer.json, tokenizer_config.json (with chat_template) and chat_template.jinja.

    `meta` is the GGUF metadata (gguf_convert.gguf_metadata). Raises ValueError when
    transformers cannot build a fast tokenizer from the file.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                              local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"no fast tokenizer could be built from {gguf_path}")
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):  # load-time arguments, not tokenizer facts
        config.pop(key, None)
    # NOTE: transformers 4.x cannot resolve 5.x's "TokenizersBackend"; both load this name.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["clean_up_tokenization_spaces"] = False
    template = meta.get("tokenizer.chat_template")
    if template:
        # 5.x saves the template to chat_template.jinja only; 4.x reads tokenizer_config.json.
        config["chat_template"] = template
        (out_dir / "chat_template.jinja").write_text(template)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
