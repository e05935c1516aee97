"""lora_ft: LoRA fine-tuning of GPT-2 (and other small causal LMs) with Hugging Face PEFT."""

__version__ = "0.1.0"
