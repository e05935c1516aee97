"""The PEFT methods by name, and what each can do (`METHODS`): the one list, read by the settings (the `method` flag's
choices: config.METHODS), the manifest check and `methods` (which builds each through PEFT), with nothing imported."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    adapter: bool  # saved as a PEFT adapter apart from the frozen base; False: the whole model is saved
    rank: bool  # reads `lora_r` (its matrices' rank)
    lora_variants: bool  # `use_rslora` and `init_lora_weights` apply
    quantized_base: bool  # trains on a 4- or 8-bit base (PEFT has bitsandbytes layers for it)
    gguf_adapter: bool  # llama.cpp's GGUF adapters hold plain LoRA pairs (alpha / r), nothing else


METHODS = {
    "lora": Method("lora", adapter=True, rank=True, lora_variants=True, quantized_base=True, gguf_adapter=True),
    "dora": Method("dora", adapter=True, rank=True, lora_variants=True, quantized_base=True, gguf_adapter=False),
    "ia3": Method("ia3", adapter=True, rank=False, lora_variants=False, quantized_base=True, gguf_adapter=False),
    # PEFT 0.21's VeRA has no bitsandbytes layers
    "vera": Method("vera", adapter=True, rank=True, lora_variants=False, quantized_base=False, gguf_adapter=False),
    "full": Method("full", adapter=False, rank=False, lora_variants=False, quantized_base=False, gguf_adapter=False),
}
