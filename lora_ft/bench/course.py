"""The course's own LoRA spam classifier, timed as the benchmark's peer.

Sebastian Raschka's "Build a Large Language Model (From Scratch)" (PyPI `llms-from-scratch`) fine-tunes GPT-2 124M
for spam classification with LoRA in appendix E. Its setup, replicated here with the package's own code:

- `ch04.GPTModel` with the 124M config the book loads OpenAI's weights into (context 1024, drop_rate 0.0,
  qkv_bias True); random weights here, since speed does not depend on their values;
- `out_head` replaced by `Linear(emb_dim, 2)`, then every parameter frozen (the new head too), then
  `appendix_e.replace_linear_with_lora(model, rank=16, alpha=16)` on every Linear, the head included;
- `ch06.SpamDataset`: every message padded with 50256 to the longest training message (120 GPT-2 tokens on the
  course's split of the SMS data, 132 on lora_ft's); a shuffled `DataLoader`, batch 8, `drop_last=True`, after
  `torch.manual_seed(123)`;
- `AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)` and `train_classifier_simple`'s step: zero_grad,
  `ch06.calc_loss_batch` (cross-entropy on the last token's logits), backward, step; fp32 throughout.

It is our peer because it is the textbook way to do the very task lora_ft's `spam` does on the same base model:
`bench` times both on the same split, batch size and rank, so that the ratio is the gain of lora_ft's path
(precision, dynamic padding, length grouping, PEFT's kernels) over what a reader of the book would run. The
course's periodic evaluation (every 50 steps) is left out, as it is for lora_ft's timed steps.

`llms-from-scratch` is optional: install it with `pip install --no-deps llms-from-scratch` (its declared
dependencies pull TensorFlow and JupyterLab; the modules used here need only torch, pandas and matplotlib).
"""

from __future__ import annotations

import io
import itertools
import time
from importlib import metadata
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..core import files

PAD_ID = 50256  # SpamDataset's default pad id: GPT-2's <|endoftext|>
LORA_ALPHA = 16  # appendix E: replace_linear_with_lora(model, rank=16, alpha=16)
LEARNING_RATE = 5e-5
WEIGHT_DECAY = 0.1
NUM_CLASSES = 2

# appendix E's BASE_CONFIG updated with model_configs["gpt2-small (124M)"]
GPT2_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "drop_rate": 0.0,
    "qkv_bias": True,
    "emb_dim": 768,
    "n_layers": 12,
    "n_heads": 12,
}


def available() -> str | None:
    """None when the course's package imports, else why not (one line)."""
    try:
        from llms_from_scratch import appendix_e, ch04, ch06  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "llms_from_scratch":
            return "llms-from-scratch is not installed: pip install --no-deps llms-from-scratch"
        return f"llms-from-scratch cannot be imported, {e.name} is missing: pip install {e.name}"
    except ImportError as e:
        return f"llms-from-scratch cannot be imported: {e}"
    return None


class _Encoder:
    """What SpamDataset asks of its tokenizer (tiktoken's `encode`), from an HF tokenizer: tiktoken would have to
    download its GPT-2 BPE, and ours is the same BPE. No special tokens added, as tiktoken adds none."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def course_dataset(
    texts: list[str], labels: list[int], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> Any:
    """ch06's SpamDataset, fed the CSV the course writes (columns Label, Text) from memory: every text padded to
    the longest one, or cut and padded to `max_length` (as the course does its validation and test sets)."""
    import pandas as pd
    from llms_from_scratch.ch06 import SpamDataset

    csv = pd.DataFrame({"Label": labels, "Text": texts}).to_csv(index=False)
    # pandas reads some texts back as something else ("NA" and "" come back as NaN, which no tokenizer encodes).
    if pd.read_csv(io.StringIO(csv))["Text"].tolist() != list(texts):
        raise ValueError("a text does not survive the course's CSV round trip (pandas reads it as a missing value)")
    return SpamDataset(io.StringIO(csv), tokenizer=_Encoder(tokenizer), max_length=max_length, pad_token_id=PAD_ID)


def course_model(config: dict[str, Any], rank: int, seed: int) -> torch.nn.Module:
    """GPTModel as appendix E leaves it: classification head, all frozen, LoRA on every Linear."""
    from llms_from_scratch.appendix_e import replace_linear_with_lora
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    model = GPTModel(config)
    torch.manual_seed(seed)  # appendix E seeds before the new head
    model.out_head = torch.nn.Linear(config["emb_dim"], NUM_CLASSES)
    for param in model.parameters():  # after the head is replaced, so the head's own weights stay frozen too
        param.requires_grad = False
    replace_linear_with_lora(model, rank=rank, alpha=LORA_ALPHA)
    return model


def flops_per_token(model: torch.nn.Module, width: int, device: torch.device) -> float:
    """FLOPs of one forward + backward of calc_loss_batch per padded token, counted by torch on one row `width`
    tokens wide (as bench.flops_per_token does for lora_ft); ids are zeros, since values do not change FLOPs."""
    from llms_from_scratch.ch06 import calc_loss_batch
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros(1, width, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        calc_loss_batch(ids, torch.zeros(1, dtype=torch.long), model, device).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / width


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: wait, so that a step's time is its own
        torch.cuda.synchronize(device)


def train_steps(
    model: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer, device: torch.device, steps: int
) -> list[float]:
    """train_classifier_simple's inner loop for `steps` steps (on into further epochs if need be), without its
    evaluation and printing; the seconds of each step, including fetching its batch (as bench's StepTimer)."""
    from llms_from_scratch.ch06 import calc_loss_batch

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # each pass reshuffles, as an epoch does
    durations = []
    start = time.perf_counter()
    for input_batch, target_batch in itertools.islice(batches, steps):
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, device)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        end = time.perf_counter()
        durations.append(end - start)
        start = end
    return durations


def lora_b_norm(model: torch.nn.Module) -> float:
    """The norm of every LoRA B matrix together: they start at zero, so it is positive only once training ran."""
    from llms_from_scratch.appendix_e import LoRALayer

    squares = [m.B.detach().float().pow(2).sum() for m in model.modules() if isinstance(m, LoRALayer)]
    return float(torch.stack(squares).sum().sqrt())


def measure(
    texts: list[str],
    labels: list[int],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 8,
    rank: int = 16,
    warmup_steps: int = 2,
    timed_steps: int | None = 12,
    architecture: dict[str, Any] | None = None,
    seed: int = 123,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Train the course's LoRA classifier on `texts` in this process for `warmup_steps` + `timed_steps` steps (one
    whole epoch, all of it timed, when `timed_steps` is None) and measure it. `architecture` overrides keys of the
    course's 124M config (emb_dim, n_layers, n_heads, context_length...), for tests. Every text is padded to the
    longest, as the course pads its training set, or cut and padded to `max_length` (the course's own split of the
    SMS data has 120 tokens at most, lora_ft's split a 132-token message)."""
    from torch.utils.data import DataLoader

    config = {**GPT2_124M, **(architecture or {})}
    dataset = course_dataset(texts, labels, tokenizer, max_length)
    pad_to = dataset.max_length
    if pad_to > config["context_length"]:
        raise ValueError(
            f"the longest text has {pad_to} tokens, over the model's context of {config['context_length']}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the course's choice
    model = course_model(config, rank, seed).to(device)
    flops = flops_per_token(model, pad_to, device)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=True)
    steps_per_epoch = len(loader)
    torch.manual_seed(seed)
    first_epoch = [inputs for inputs, _ in loader]  # the batches the timed run sees first (same seed, same order)
    real_tokens = sum(int((inputs != PAD_ID).sum()) for inputs in first_epoch)  # SpamDataset pads only at the end

    torch.manual_seed(seed)  # as appendix E does before its optimizer and train_classifier_simple
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = steps_per_epoch if timed_steps is None else warmup_steps + timed_steps
    durations = train_steps(model, loader, optimizer, device, steps)[0 if timed_steps is None else warmup_steps :]

    seconds_per_step = sum(durations) / len(durations)
    seconds_per_epoch = seconds_per_step * steps_per_epoch  # every batch is batch_size x pad_to: all alike
    padded_tokens = steps_per_epoch * batch_size * pad_to
    result = {
        "description": f"llms-from-scratch appendix E: fp32, every input padded to {pad_to}, random order",
        "llms_from_scratch_version": metadata.version("llms-from-scratch"),
        "architecture": config,
        "device": str(device),
        "batch_size": batch_size,
        "lora_rank": rank,
        "lora_alpha": LORA_ALPHA,
        "pad_to": pad_to,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_per_epoch": steps_per_epoch,
        "steps_timed": len(durations),
        "epoch_measured_whole": timed_steps is None,
        "seconds_per_step": seconds_per_step,
        "seconds_per_epoch": seconds_per_epoch,
        "real_tokens_per_epoch": real_tokens,
        "padded_tokens_per_epoch": padded_tokens,
        "real_token_share": real_tokens / padded_tokens,
        "real_tokens_per_second": real_tokens / seconds_per_epoch,
        "flops_per_padded_token": flops,
        "gflops_per_second": flops * padded_tokens / seconds_per_epoch / 1e9,
        "lora_b_norm": lora_b_norm(model),
        "peak_rss_bytes": files.peak_rss_bytes(),
    }
    if device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return result
