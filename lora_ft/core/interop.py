"""What adapter folders and exports carry so that tools other than transformers 5 read them as they are:
transformers 4.x, and llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py), which read the
config and tokenizer files directly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import write_json_atomically

# A tokenizer class name only transformers 5 knows (its generic `tokenizers`-backed class, which a tokenizer read
# from a GGUF file gets): transformers 4.x and llama.cpp's converter fail on it. Both know the fast generic one.
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """`tokenizer` saved into `folder` as transformers 5 saves it, then rewritten for older readers: a tokenizer
    class they know, and the chat template inside tokenizer_config.json as well as in chat_template.jinja beside it
    (4.x before 4.43 and llama.cpp's converter look for it there only)."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS.get(name, name)
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text(encoding="utf-8")
    write_json_atomically(path, config)


def portable_config(folder: Path) -> None:
    """Add to a merged export's config.json the keys older readers look for: GPT-2's `n_ctx` (the same value as
    `n_positions`; transformers 5 no longer writes it, and llama.cpp's GPT-2 converter reads it)."""
    path = folder / "config.json"
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config["n_positions"]
        write_json_atomically(path, config)
